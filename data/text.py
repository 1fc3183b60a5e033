"""Text conditioning: prompts -> per-token features from several Qwen3-VL hidden layers.

Krea 2 conditions on Qwen3-VL-4B hidden states taken from 12 layers, with prompts
wrapped in the Qwen-Image chat template and the system prefix dropped. `TextEncoder`
reproduces diffusers' `Krea2Pipeline.get_text_hidden_states` step by step for any
Qwen3-VL checkpoint folder; `build_tiny_encoder` makes a small one (a locally trained
tokenizer and a 4-layer language model trained for seconds on the world's captions, so
its hidden states are contextual the way a pretrained encoder's are) so the demo and
tests run the same code path without downloading anything.

Token layout (padding sits *inside* the template, before the assistant suffix):

    [ system prefix (34) | prompt | PAD ... | <|im_end|> \n <|im_start|> assistant \n ]
    '----- dropped -----'  '------------- max_len tokens returned ---------------'

Layer convention: `layers` index transformers' `hidden_states` tuple, where
`hidden_states[0]` is the token embeddings and `hidden_states[i]` is the output of
decoder layer i (1-based). The last entry, `hidden_states[num_hidden_layers]`, is the
final output *after* the model's last RMSNorm (transformers replaces it with
`last_hidden_state`); Krea's taps (2, 5, ..., 35 of 36) never touch it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLModel
from transformers.utils import logging as hf_logging

SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
# The Qwen-Image prompt template, split where Krea 2 pads: diffusers' Krea2Pipeline
# tokenizes PROMPT_PREFIX + prompt, pads that, then appends PROMPT_SUFFIX.
PROMPT_PREFIX = "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
CHAT_TEMPLATE = PROMPT_PREFIX + "{}" + PROMPT_SUFFIX
PAD_TOKEN = "<|endoftext|>"
# Qwen's chat and vision markers; the vision ones give the tiny model's config real ids.
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


@contextlib.contextmanager
def _quiet_progress():
    # transformers draws a progress bar per load/save; for a 2 MB model on every rank that is noise.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- tokenizer --------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], out_dir: str | os.PathLike, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` plus the chat template, save it to out_dir.

    Byte-level (like Qwen's own tokenizer) so any string round-trips exactly, newlines
    and punctuation of the template included; the corpus is tiny, so with a few hundred
    merges every caption word ends up a single token.
    """
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    corpus = list(texts) + [CHAT_TEMPLATE.format(""), SYSTEM_PROMPT, "system user assistant"]
    tokenizer = Tokenizer(models.BPE())
    # The GPT-2 split regex keeps "\n" apart from the words around it, so the template's
    # system prefix tokenizes the same alone as in front of a prompt.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


# ---- encoder ----------------------------------------------------------------------------------
class TextEncoder:
    """Prompts -> (features_BTKD, mask_BT) from K hidden layers of a Qwen3-VL language model.

    T = max_len tokens kept after the dropped system prefix: the prompt (at most
    max_len - num_suffix_tokens of it), padding, then the assistant suffix, exactly as
    diffusers' Krea2Pipeline lays them out. D = the model width.
    """

    def __init__(self, tokenizer, model: Qwen3VLModel, layers: list[int], max_len: int):
        num_hidden = model.config.text_config.num_hidden_layers
        if not layers:
            raise ValueError("layers must name at least one hidden state")
        bad = [i for i in layers if not 0 <= i <= num_hidden]
        if bad:
            raise ValueError(f"layers {bad} out of range: hidden_states has indices 0 (embeddings) "
                             f"to {num_hidden} (last decoder layer) for this model")
        if tokenizer.pad_token is None:
            raise ValueError("the tokenizer has no pad token; Qwen tokenizers use <|endoftext|>")
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.layers = list(layers)
        self.max_len = max_len
        # The pipeline hard-codes these counts for Qwen's tokenizer (start index 34,
        # 5 suffix tokens); counting them here gives the same numbers for Qwen and the
        # right ones for any other tokenizer (the tiny one included).
        prefix_ids = tokenizer(PROMPT_PREFIX)["input_ids"]
        self.prefix_len = len(prefix_ids)
        self.num_suffix_tokens = len(tokenizer(PROMPT_SUFFIX)["input_ids"])
        if max_len <= self.num_suffix_tokens:
            raise ValueError(f"max_len must exceed the {self.num_suffix_tokens} template suffix tokens "
                             f"that every prompt ends with, got {max_len}")
        probe = tokenizer(PROMPT_PREFIX + "a red circle")["input_ids"]
        if probe[: self.prefix_len] != prefix_ids:
            raise ValueError("this tokenizer merges the template's system prefix with the prompt; "
                             "the prefix cannot be dropped by a fixed token count")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, layers: list[int], max_len: int,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load tokenizer + Qwen3VLModel from a local folder (a real Qwen3-VL checkpoint or a tiny one)."""
        path = str(path)
        if not Path(path).is_dir():
            raise ValueError(f"text encoder path {path!r} is not a folder")
        tokenizer = AutoTokenizer.from_pretrained(path)
        with _quiet_progress():
            model = Qwen3VLModel.from_pretrained(path, dtype=dtype).to(device)
        return cls(tokenizer, model, layers, max_len)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_BS, mask_BS) with S = prefix_len + max_len: `[prefix + prompt | PAD | suffix]`."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode takes a non-empty list of prompt strings")
        body = self.tokenizer(
            [PROMPT_PREFIX + p for p in prompts],
            max_length=self.prefix_len + self.max_len - self.num_suffix_tokens,
            padding="max_length",
            truncation=True,  # over-long prompts lose their tail; the suffix always survives
            return_tensors="pt",
        )
        suffix = self.tokenizer([PROMPT_SUFFIX] * len(prompts), return_tensors="pt")
        ids_BS = torch.cat([body["input_ids"], suffix["input_ids"]], dim=1)
        mask_BS = torch.cat([body["attention_mask"], suffix["attention_mask"]], dim=1).bool()
        return ids_BS, mask_BS

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features_BTKD in the model dtype, mask_BT bool); padded positions are exactly zero.

        mask_BT is True on the prompt tokens and on the suffix after the padding (never
        a single run of True once a prompt is padded).
        """
        ids_BS, mask_BS = self.tokenize(prompts)
        ids_BS, mask_BS = ids_BS.to(self.device), mask_BS.to(self.device)
        # Positions count valid tokens only (cumsum(mask) - 1), so the suffix continues
        # right after the prompt as if there were no padding in between; the same
        # position on the 3 M-RoPE axes (time, height, width), as for any text-only input.
        pos_BS = (mask_BS.long().cumsum(-1) - 1).clamp(min=0)
        pos_3BS = pos_BS[None].expand(3, -1, -1)
        out = self.model(
            input_ids=ids_BS,
            attention_mask=mask_BS,
            position_ids=pos_3BS,
            output_hidden_states=True,
            use_cache=False,
        )
        feats_BSKD = torch.stack([out.hidden_states[i] for i in self.layers], dim=2)
        feats_BTKD = feats_BSKD[:, self.prefix_len:]
        mask_BT = mask_BS[:, self.prefix_len:]
        # The pipeline keeps whatever the encoder computed at padded positions; we zero
        # them (masked_fill, not a multiply: +0.0 bitwise, never -0.0 or NaN * 0) so the
        # shards need not store them and the DiT, which masks them anyway, sees the same.
        feats_BTKD = feats_BTKD.masked_fill(~mask_BT[:, :, None, None], 0.0)
        return feats_BTKD, mask_BT


# ---- the tiny demo encoder --------------------------------------------------------------------
def tiny_encoder_config(vocab_size: int, pad_token_id: int, vision_ids: dict[str, int]) -> Qwen3VLConfig:
    """A Qwen3-VL with a 4-layer, width-128 language model and a token vision tower."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        # Qwen3-VL's interleaved M-RoPE; the sections split head_dim/2 = 16 frequencies
        # over (time, height, width) like the real [24, 20, 20] splits 64.
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **vision_ids)


# Training of the tiny encoder (`train_tiny_encoder`): prompt slots named per position.
PROMPT_SLOTS = 11  # prompt tokens a 16-token demo window holds (16 - 5 suffix tokens)


def _slot_targets(encoder: "TextEncoder", texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_BS, mask_BS, targets_BTW): at every kept position t, slot k names the k-th
    prompt token if the position has seen it (t >= k), else the extra class `vocab`;
    -100 (ignored) at padding."""
    ids_BS, mask_BS = encoder.tokenize(texts)
    vocab = len(encoder.tokenizer)
    T = ids_BS.shape[1] - encoder.prefix_len
    targets_BTW = torch.full((len(texts), T, PROMPT_SLOTS), vocab, dtype=torch.long)
    for b, text in enumerate(texts):
        for k, tok in enumerate(encoder.tokenizer(text)["input_ids"][:min(PROMPT_SLOTS, T)]):
            targets_BTW[b, k:, k] = tok
    targets_BTW[~mask_BS[:, encoder.prefix_len:]] = -100
    return ids_BS, mask_BS, targets_BTW


def train_tiny_encoder(encoder: "TextEncoder", texts: list[str], seed: int = 0, max_steps: int = 600,
                       batch_size: int = 16, lr: float = 5e-3, target: float = 0.97, check_every: int = 50) -> dict:
    """Train `encoder.model` in place so that its last hidden state at every prompt
    position names each prompt token seen so far, by its slot ("prefix reconstruction").

    A randomly initialised encoder's features are a bag of words: in "a purple triangle
    above a green circle" its "triangle" differs by 0.1% from the one in "a green
    triangle above a purple circle", so no DiT can tell which colour goes with which
    shape, or which object comes first. A pretrained LLM's hidden states carry that
    context; this objective puts it into the tiny one's (the same comparison: ~50%).

    Linear slot heads (thrown away afterwards) read the final hidden state; AdamW on one
    CPU thread (bitwise reproducible for the same texts and seed, and never oversubscribed
    on a busy machine) until the slot accuracy
    on a fixed probe batch reaches `target`, or `max_steps`. Returns a small report.
    """
    if not texts:
        raise ValueError("train_tiny_encoder needs at least one text")
    texts = sorted(set(texts))
    model = encoder.model
    width, vocab = model.config.text_config.hidden_size, len(encoder.tokenizer)
    last = model.config.text_config.num_hidden_layers
    ids_NS, mask_NS, targets_NTW = _slot_targets(encoder, texts)
    pos_NS = (mask_NS.long().cumsum(-1) - 1).clamp(min=0)
    P = encoder.prefix_len
    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randperm(len(texts), generator=generator)[:128]

    def slot_logits(idx: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids_NS[idx], attention_mask=mask_NS[idx], position_ids=pos_NS[idx][None].expand(3, -1, -1),
                    output_hidden_states=True, use_cache=False)
        h_BTD = out.hidden_states[last][:, P:]
        return head(h_BTD).unflatten(-1, (PROMPT_SLOTS, vocab + 1))

    def accuracy() -> float:
        with torch.no_grad():
            logits = slot_logits(probe)
        valid = targets_NTW[probe] != -100
        return (logits.argmax(-1) == targets_NTW[probe])[valid].float().mean().item()

    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = torch.nn.Linear(width, PROMPT_SLOTS * (vocab + 1))
        model.train().requires_grad_(True)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
        step, acc = 0, 0.0
        while step < max_steps:
            idx = torch.randint(0, len(texts), (batch_size,), generator=generator)
            logits = slot_logits(idx)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets_NTW[idx].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % check_every == 0 or step == max_steps:
                acc = accuracy()
                if acc >= target:
                    break
    finally:
        torch.set_num_threads(threads)
        model.eval().requires_grad_(False)
    return {"steps": step, "slot_accuracy": round(acc, 4), "loss": round(loss.item(), 4)}


def build_tiny_encoder(out_dir: str | os.PathLike, vocabulary_texts: list[str], seed: int = 0,
                       train_steps: int = 600) -> str:
    """Train a tokenizer on vocabulary_texts and save it with a tiny Qwen3VLModel, seeded,
    then trained on the same texts by `train_tiny_encoder` (at most `train_steps`; 0
    keeps the random weights, which only tests of the plumbing want).

    Same texts, seed and steps give bitwise the same folder contents, so ranks that build
    it independently agree. Load with `TextEncoder.from_pretrained(out_dir, layers=[1, 2, 3, 4], ...)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocabulary_texts, out_dir)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    config = tiny_encoder_config(len(tokenizer), tokenizer.pad_token_id, ids)
    # A private RNG stream: building the encoder must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLModel(config)
        # With transformers' default embedding init (std 0.02) the randomly
        # initialised layers drown the token identity: in the last tapped layer
        # "circle" and "square" came out at cosine 0.93. Unit-variance embeddings
        # keep every tapped layer token-specific (cosine ~0.2) from the start.
        with torch.no_grad():
            embed = model.get_input_embeddings().weight
            embed.normal_(0.0, 1.0)
    if train_steps:
        encoder = TextEncoder(tokenizer, model, layers=[config.text_config.num_hidden_layers],
                              max_len=PROMPT_SLOTS + len(tokenizer(PROMPT_SUFFIX)["input_ids"]))
        report = train_tiny_encoder(encoder, vocabulary_texts, seed=seed, max_steps=train_steps)
        (out_dir / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    with _quiet_progress():
        model.save_pretrained(str(out_dir))
    return str(out_dir)
