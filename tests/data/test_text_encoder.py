"""Tokenizer and TextEncoder against direct Qwen3VLModel computations on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from data.text import CHAT_TEMPLATE, SPECIAL_TOKENS, TextEncoder, build_tiny_encoder

PROMPTS = ["a red circle above a blue square", "", "an orange triangle", "a purple square to the left of a green circle"]


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


def test_encode_matches_direct_model_computation(encoder):
    layers = [0, 1, 3, 4]
    enc = TextEncoder(encoder.tokenizer, encoder.model, layers=layers, max_len=24)
    feats_BTKD, mask_BT = enc.encode(PROMPTS)
    assert feats_BTKD.shape == (len(PROMPTS), 24, len(layers), 128) and mask_BT.dtype == torch.bool
    assert enc.prefix_len == 34
    for b, prompt in enumerate(PROMPTS):
        ids = enc.tokenizer(CHAT_TEMPLATE.format(prompt), return_tensors="pt")["input_ids"]
        n_prompt = ids.shape[1] - enc.prefix_len
        assert mask_BT[b].sum() == n_prompt and mask_BT[b, :n_prompt].all()
        ref_SKD = _hooked_reference(enc.model, ids, layers)
        torch.testing.assert_close(feats_BTKD[b, :n_prompt], ref_SKD[enc.prefix_len:], atol=2e-5, rtol=1e-4)

    # The same batch through Qwen3VLModel with explicit text-only M-RoPE ids (3, B, S) = cumsum(mask) - 1.
    ids_BS, mask_BS = enc.tokenize(PROMPTS)
    pos_3BS = (mask_BS.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    with torch.no_grad():
        out = enc.model(input_ids=ids_BS, attention_mask=mask_BS.long(), position_ids=pos_3BS, output_hidden_states=True)
    direct_BTKD = torch.stack([out.hidden_states[i] for i in layers], dim=2)[:, enc.prefix_len:]
    valid = mask_BT[:, :, None, None].expand_as(feats_BTKD)
    torch.testing.assert_close(feats_BTKD[valid], direct_BTKD[valid], atol=2e-5, rtol=1e-4)


def test_padding_is_zero_and_truncation_keeps_max_len(encoder):
    feats_BTKD, mask_BT = encoder.encode(PROMPTS)
    padded = ~mask_BT
    assert padded.any()
    assert (feats_BTKD[padded].view(torch.int32) == 0).all()  # +0.0 bitwise
    assert (feats_BTKD[mask_BT].abs().sum(-1) > 0).all()
    # masks are a valid-prefix then padding, never holes
    assert torch.equal(mask_BT, torch.arange(24)[None] < mask_BT.sum(1, keepdim=True))
    long_prompt = " ".join(["a red circle above a blue square"] * 6)
    feats, mask = encoder.encode([long_prompt])
    assert mask.all() and feats.shape[1] == 24
    full_ids = encoder.tokenizer(CHAT_TEMPLATE.format(long_prompt))["input_ids"]
    ids_BS, _ = encoder.tokenize([long_prompt])
    assert ids_BS[0].tolist() == full_ids[: encoder.prefix_len + 24]


def test_features_differ_between_prompts_and_ignore_batch_mates(encoder):
    feats, _ = encoder.encode(["a red circle", "a blue circle", "a red circle"])
    assert torch.equal(feats[0], feats[2])
    assert not torch.allclose(feats[0], feats[1])
    alone, _ = encoder.encode(["a red circle"])
    torch.testing.assert_close(alone[0], feats[0], atol=1e-6, rtol=0)


def test_tiny_encoder_build_is_deterministic(tmp_path, world, tiny_encoder_dir):
    texts = world.all_captions()
    again = build_tiny_encoder(tmp_path / "again", texts, seed=0)
    other = build_tiny_encoder(tmp_path / "other", texts, seed=1)
    ref, same, diff = (load_file(str(Path(p) / "model.safetensors")) for p in (tiny_encoder_dir, again, other))
    assert ref.keys() == same.keys() and all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref if k.endswith("embed_tokens.weight"))
    assert (Path(again) / "tokenizer.json").read_text() == (Path(tiny_encoder_dir) / "tokenizer.json").read_text()
    config = json.loads((Path(again) / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (128, 4, 4, 2, 32, 256)


def test_layers_out_of_range_raise(encoder):
    with pytest.raises(ValueError, match="out of range"):
        TextEncoder(encoder.tokenizer, encoder.model, layers=[1, 5], max_len=24)
    with pytest.raises(ValueError):
        encoder.encode("a red circle")  # a bare string, not a list
