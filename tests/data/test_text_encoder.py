"""Tokenizer and TextEncoder against diffusers' Krea2Pipeline and direct Qwen3VLModel computations
on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from data.text import CHAT_TEMPLATE, PROMPT_PREFIX, PROMPT_SUFFIX, SPECIAL_TOKENS, TextEncoder, build_tiny_encoder

LONG = " ".join(["a red circle above a blue square"] * 6)  # 42 tokens: truncated at max_len 24
PROMPTS = ["a red circle above a blue square", "", "an orange triangle", "a purple square to the left of a green circle",
           LONG]


def test_tokenizer_round_trip(tiny_encoder_dir, world):
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for special in SPECIAL_TOKENS:
        assert len(tok(special)["input_ids"]) == 1, special
    for text in world.all_captions()[::50] + [CHAT_TEMPLATE.format("a red circle"), "colour?\n\tunseen word!"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    # trained on the captions: every caption word is one token (with its leading space)
    assert len(tok("a purple triangle to the right of an orange circle")["input_ids"]) == 10
    # trained on the template: the system prompt is whole words too, like Qwen's 34-token prefix
    assert len(tok(CHAT_TEMPLATE.split("{}")[0])["input_ids"]) == 34


def _hooked_reference(model, ids_1S: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Per-layer outputs of one unpadded sequence with default positions, read off forward hooks."""
    lm = model.language_model
    captured = {}

    def keep(i):
        return lambda module, args, out: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(lm.layers, start=1)]
    try:
        with torch.no_grad():
            model(input_ids=ids_1S, use_cache=False)
            embeds_1SD = lm.embed_tokens(ids_1S)
    finally:
        for h in hooks:
            h.remove()
    num_layers = len(lm.layers)
    captured[0] = embeds_1SD
    with torch.no_grad():
        captured[num_layers] = lm.norm(captured[num_layers])  # documented: the last index is post-norm
    return torch.stack([captured[i][0] for i in layers], dim=1)  # (S, K, D)


def tiny_krea2_pipeline(encoder: TextEncoder) -> Krea2Pipeline:
    """diffusers' own Krea2Pipeline around the tiny tokenizer and Qwen3VLModel (tiny VAE and transformer
    only to satisfy its constructor; get_text_hidden_states touches neither)."""
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=1, attention_head_dim=32, num_attention_heads=1, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=32, text_hidden_dim=encoder.dim, num_text_layers=encoder.num_layers,
        text_num_attention_heads=4, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=[8, 12, 12],
    )  # fmt: skip
    return Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder.model,
                         tokenizer=encoder.tokenizer, transformer=transformer, text_encoder_select_layers=encoder.layers)


def test_encode_equals_the_krea2_pipeline(encoder):
    pipe = tiny_krea2_pipeline(encoder)
    # Our template is the pipeline's, and the tiny tokenizer cuts it where Qwen's does, so the
    # pipeline's hard-coded counts (34 prefix tokens, 5 suffix tokens) hold for it unchanged.
    assert (pipe.prompt_template_encode_prefix, pipe.prompt_template_encode_suffix) == (PROMPT_PREFIX, PROMPT_SUFFIX)
    assert (encoder.prefix_len, encoder.num_suffix_tokens) == (
        pipe.prompt_template_encode_start_idx, pipe.prompt_template_encode_num_suffix_tokens) == (34, 5)

    theirs_BTKD, their_mask_BT = pipe.get_text_hidden_states(PROMPTS, max_sequence_length=24, device=torch.device("cpu"))
    ours_BTKD, mask_BT = encoder.encode(PROMPTS)
    assert ours_BTKD.shape == theirs_BTKD.shape == (len(PROMPTS), 24, 4, 128)
    assert torch.equal(mask_BT, their_mask_BT)
    # Bitwise equal on every token the pipeline marks valid; ours is +0.0 where it is padding.
    assert torch.equal(ours_BTKD, theirs_BTKD.masked_fill(~their_mask_BT[:, :, None, None], 0.0))


def test_encode_replicates_the_pipeline_steps(encoder):
    """The same steps written out against Qwen3VLModel: [prefix + prompt | PAD | suffix], positions
    cumsum(mask) - 1 on the 3 M-RoPE axes, layers stacked on dim 2, prefix dropped."""
    layers = [0, 1, 3, 4]
    enc = TextEncoder(encoder.tokenizer, encoder.model, layers=layers, max_len=24)
    tok = enc.tokenizer
    body = tok([PROMPT_PREFIX + p for p in PROMPTS], max_length=34 + 24 - 5, padding="max_length", truncation=True,
               return_tensors="pt")
    suffix = tok([PROMPT_SUFFIX] * len(PROMPTS), return_tensors="pt")
    ids_BS = torch.cat([body.input_ids, suffix.input_ids], dim=1)
    mask_BS = torch.cat([body.attention_mask, suffix.attention_mask], dim=1).bool()
    assert torch.equal(enc.tokenize(PROMPTS)[0], ids_BS) and torch.equal(enc.tokenize(PROMPTS)[1], mask_BS)
    pos_3BS = (mask_BS.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
    with torch.no_grad():
        out = enc.model(input_ids=ids_BS, attention_mask=mask_BS, position_ids=pos_3BS, output_hidden_states=True)
    direct_BTKD = torch.stack([out.hidden_states[i] for i in layers], dim=2)[:, 34:]

    feats_BTKD, mask_BT = enc.encode(PROMPTS)
    assert feats_BTKD.shape == (len(PROMPTS), 24, len(layers), 128) and mask_BT.dtype == torch.bool
    assert torch.equal(mask_BT, mask_BS[:, 34:])
    valid = mask_BT[:, :, None, None].expand_as(feats_BTKD)
    assert torch.equal(feats_BTKD[valid], direct_BTKD[valid])


def test_padding_inside_the_template_is_invisible(encoder):
    """Padding is masked and takes no position, so each valid token's features equal those of the
    unpadded sequence prefix + prompt + suffix run with default positions."""
    layers = [0, 1, 3, 4]
    enc = TextEncoder(encoder.tokenizer, encoder.model, layers=layers, max_len=24)
    feats_BTKD, mask_BT = enc.encode(PROMPTS[:4])
    for b, prompt in enumerate(PROMPTS[:4]):
        ids = enc.tokenizer(CHAT_TEMPLATE.format(prompt), return_tensors="pt")["input_ids"]
        n_valid = ids.shape[1] - enc.prefix_len  # prompt + 5 suffix tokens
        assert mask_BT[b].sum() == n_valid
        ref_SKD = _hooked_reference(enc.model, ids, layers)
        torch.testing.assert_close(feats_BTKD[b][mask_BT[b]], ref_SKD[enc.prefix_len:], atol=2e-5, rtol=1e-4)


def test_layout_padding_is_zero_and_truncation_keeps_the_suffix(encoder):
    ids_BS, mask_BS = encoder.tokenize(PROMPTS)
    assert ids_BS.shape == (len(PROMPTS), 34 + 24)
    suffix_ids = encoder.tokenizer(PROMPT_SUFFIX)["input_ids"]
    prefix_ids = encoder.tokenizer(PROMPT_PREFIX)["input_ids"]
    for b, prompt in enumerate(PROMPTS):
        prompt_ids = encoder.tokenizer(PROMPT_PREFIX + prompt)["input_ids"][34:][: 24 - 5]
        n_pad = 24 - 5 - len(prompt_ids)
        expected = prefix_ids + prompt_ids + [encoder.tokenizer.pad_token_id] * n_pad + suffix_ids
        assert ids_BS[b].tolist() == expected
        assert mask_BS[b].tolist() == [True] * (34 + len(prompt_ids)) + [False] * n_pad + [True] * 5

    feats_BTKD, mask_BT = encoder.encode(PROMPTS)
    padded = ~mask_BT
    assert padded.any()
    assert (feats_BTKD[padded].view(torch.int32) == 0).all()  # +0.0 bitwise
    assert (feats_BTKD[mask_BT].abs().sum(-1) > 0).all()
    # the empty prompt still has the 5 suffix tokens; the long one is full, its tail cut, suffix kept
    assert mask_BT[1].tolist() == [False] * 19 + [True] * 5
    assert mask_BT[4].all() and ids_BS[4, -5:].tolist() == suffix_ids
    with pytest.raises(ValueError, match="suffix"):
        TextEncoder(encoder.tokenizer, encoder.model, layers=[1], max_len=5)


def test_features_differ_between_prompts_and_ignore_batch_mates(encoder):
    feats, _ = encoder.encode(["a red circle", "a blue circle", "a red circle"])
    assert torch.equal(feats[0], feats[2])
    assert not torch.allclose(feats[0], feats[1])
    alone, _ = encoder.encode(["a red circle"])
    torch.testing.assert_close(alone[0], feats[0], atol=1e-6, rtol=0)


def test_tiny_encoder_build_is_deterministic(tmp_path, world, tiny_encoder_dir):
    # A short training (20 steps) makes the same point as the demo's: same texts and seed
    # give bitwise the same weights, another seed other weights.
    texts = world.all_captions()
    again, again2 = (build_tiny_encoder(tmp_path / name, texts, seed=0, train_steps=20) for name in ("a", "b"))
    other = build_tiny_encoder(tmp_path / "other", texts, seed=1, train_steps=20)
    ref, same, diff = (load_file(str(Path(p) / "model.safetensors")) for p in (again, again2, other))
    assert ref.keys() == same.keys() and all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref if k.endswith("embed_tokens.weight"))
    assert (Path(again) / "tokenizer.json").read_text() == (Path(tiny_encoder_dir) / "tokenizer.json").read_text()
    config = json.loads((Path(again) / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (128, 4, 4, 2, 32, 256)


def _context_share(encoder: TextEncoder) -> tuple[float, float]:
    """How much "triangle" (the 3rd token) changes when the colour before it changes, and how
    much "purple" changes between first and second object, relative to its norm, in the
    last tapped layer."""
    feats, _ = encoder.encode(["a purple triangle above a green circle", "a green triangle above a purple circle"])
    a, b = feats[0, :, -1], feats[1, :, -1]
    triangle = ((a[2] - b[2]).norm() / a[2].norm()).item()
    purple = ((a[1] - b[5]).norm() / a[1].norm()).item()
    return triangle, purple


def test_trained_tiny_encoder_is_contextual(tmp_path, world, encoder, tiny_encoder_dir):
    # The demo's encoder (trained) against the same build with its random weights: the random
    # one is a bag of words (a token barely depends on the ones before it), so a DiT cannot tell
    # "a purple triangle above a green circle" from "a green triangle above a purple circle".
    report = json.loads((Path(tiny_encoder_dir) / "training.json").read_text())
    assert report["slot_accuracy"] >= 0.97 and report["steps"] <= 600
    untrained = TextEncoder.from_pretrained(build_tiny_encoder(tmp_path / "random", world.all_captions(), seed=0,
                                                               train_steps=0), layers=[1, 2, 3, 4], max_len=24)
    assert not (tmp_path / "random" / "training.json").exists()
    random_triangle, random_purple = _context_share(untrained)
    triangle, purple = _context_share(encoder)
    assert random_triangle < 0.02 and random_purple < 0.05  # measured: 0.005 and 0.015
    assert triangle > 0.2 and purple > 0.5  # measured: ~0.8 and ~1.3
    # Training leaves the features of equal prompts equal and of different prompts apart.
    feats, _ = encoder.encode(["a red circle", "a red circle", "a red square"])
    assert torch.equal(feats[0], feats[1]) and not torch.allclose(feats[0], feats[2])


def test_layers_out_of_range_raise(encoder):
    with pytest.raises(ValueError, match="out of range"):
        TextEncoder(encoder.tokenizer, encoder.model, layers=[1, 5], max_len=24)
    with pytest.raises(ValueError):
        encoder.encode("a red circle")  # a bare string, not a list
