"""K2DiT properties: masking, adaLN-Zero init, sizes, FLOPs, latent packing."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from trainer.model import K2DiT, ModelConfig, flops_per_sample, patchify, positions, unpatchify
from trainer.model.dit import build_on_meta
from trainer.model.layers import rope_tables

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def load_cfg(name: str) -> ModelConfig:
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml")))
    cfg.validate()
    return cfg


def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        name="tiny", latent_channels=3, patch_size=2, dim=64, num_blocks=2, num_heads=2, num_kv_heads=1,
        mlp_hidden=96, timestep_dim=32, text_dim=32, num_text_layers=3, text_num_heads=2, text_num_kv_heads=1,
        text_mlp_hidden=64, rope_axes=[8, 12, 12],
    )  # fmt: skip


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, including the zero-initialised tables and norms."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        std = 0.2 if p.ndim == 1 or p.shape[-1] <= 16 else p.shape[-1] ** -0.5
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def inputs(cfg: ModelConfig, B=3, T=7, h=4, w=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, cfg.in_channels, generator=gen)
    text = torch.randn(B, T, cfg.num_text_layers, cfg.text_dim, generator=gen)
    t = torch.rand(B, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    return x, text, t, positions(T, h, w), mask


def test_padded_text_tokens_do_not_affect_image_output():
    cfg = tiny_cfg()
    model = K2DiT(cfg).eval()
    randomize_(model)
    x, text, t, pos, mask = inputs(cfg)
    with torch.no_grad():
        ref = model(x, text, t, pos, mask)
        garbage = text.clone()
        garbage[~mask] = torch.randn_like(garbage[~mask]) * 100
        assert torch.equal(model(x, garbage, t, pos, mask), ref)
        # Even NaN padding (an encoder's undefined lanes) must not leak through attention.
        garbage[~mask] = float("nan")
        assert torch.equal(model(x, garbage, t, pos, mask), ref)
        # A sample with no valid text token at all stays finite and text-independent.
        empty = mask.clone()
        empty[0] = False
        out = model(x, text, t, pos, empty)
        assert torch.isfinite(out).all()
        assert torch.equal(model(x, torch.randn_like(text), t, pos, empty)[0], out[0])
        # Control: a valid token does matter, so the comparisons above are not vacuous.
        changed = text.clone()
        changed[1, 0] += 1.0
        assert not torch.allclose(model(x, changed, t, pos, mask)[1], ref[1])


def test_init_makes_every_block_identity_and_output_depend_on_final_layer_only():
    cfg = tiny_cfg()
    model = K2DiT(cfg)
    model.init_weights(0)
    x, text, t, pos, mask = inputs(cfg)

    # Weights that must be random are: attention projections of block 0 differ from zero.
    assert model.blocks[0].attn.q.weight.std() > 0.01
    assert torch.count_nonzero(model.time_proj.weight) == 0

    with torch.no_grad():
        temb = model.time_mlp(t, x.dtype)
        tmod = model.time_proj(torch.nn.functional.gelu(temb, approximate="tanh")).unflatten(-1, (6, -1))
        cos, sin = rope_tables(pos, cfg.rope_axes, cfg.rope_theta)
        h = torch.randn(x.shape[0], pos.shape[0], cfg.dim)
        mask_B11S = torch.cat((mask, mask.new_ones(x.shape[0], x.shape[1])), 1)[:, None, None]
        for block in model.blocks:
            assert torch.equal(block(h, tmod, cos, sin, mask_B11S), h)

        assert torch.count_nonzero(model(x, text, t, pos, mask)) == 0  # final linear is zero: v = 0
        torch.nn.init.normal_(model.final.linear.weight)
        out = model(x, text, t, pos, mask)
        expected = model.final(model.img_in(x), temb)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert out.abs().max() > 0.1
        assert torch.equal(model(x, torch.randn_like(text), t, pos, mask), out)  # text cannot matter yet


def test_init_weights_is_reproducible_from_a_seed():
    a, b = K2DiT(tiny_cfg()), K2DiT(tiny_cfg())
    a.init_weights(3)
    b.init_weights(3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(
    "name, expected",
    [("12b", 12_820_073_036), ("2b", 2_228_453_964)],
)
def test_parameter_counts_of_named_sizes(name, expected):
    model = build_on_meta(load_cfg(name))
    assert model.num_params() == expected


def test_debug_size_is_small():
    cfg = load_cfg("debug")
    assert cfg.in_channels == 48  # 3 RGB channels, patch 4
    assert 15e6 <= build_on_meta(cfg).num_params() <= 20e6


@pytest.mark.parametrize("name, expected", [("12b", 3.87e14), ("2b", 7.25e13)])
def test_flops_per_sample_match_reference_numbers(name, expected):
    flops = flops_per_sample(load_cfg(name), text_tokens=512, image_tokens=4096)
    assert abs(flops / expected - 1) < 0.01


def test_flops_grow_quadratically_in_attention():
    cfg = load_cfg("2b")
    one, two = flops_per_sample(cfg, 512, 4096), flops_per_sample(cfg, 512, 4096 * 2 + 512)
    # Doubling S more than doubles cost (S² attention term), but by less than 4×.
    assert 2.0 < two / one < 4.0


def test_patchify_matches_krea2_pipeline_packing_and_inverts():
    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = Krea2Pipeline._pack_latents(SimpleNamespace(patch_size=2), latents, 2, 16, 8, 12)
    assert torch.equal(patchify(latents, 2), packed)
    assert torch.equal(unpatchify(packed, 2, 8, 12), latents)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 10, 10), 4)


def test_positions_match_krea2_pipeline():
    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline

    ours = positions(5, 3, 4)
    assert ours.shape == (5 + 12, 3) and not ours.is_floating_point()
    assert torch.equal(ours.float(), Krea2Pipeline.prepare_position_ids(5, 3, 4, "cpu"))


def test_forward_rejects_mismatched_inputs():
    cfg = tiny_cfg()
    model = K2DiT(cfg)
    x, text, t, pos, mask = inputs(cfg)
    with pytest.raises(ValueError, match="pos_S3"):
        model(x, text, t, pos[:-1], mask)
    with pytest.raises(ValueError, match="text features"):
        model(x, text[:, :, :2], t, pos, mask)
