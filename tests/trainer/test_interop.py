"""K2DiT is numerically diffusers' Krea2Transformer2DModel, and weights move both ways
between our layout, diffusers' and the official release's."""

import json

import pytest
import torch
from diffusers import Krea2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

from trainer.model import K2DiT, ModelConfig, load_pretrained, positions, save_pretrained
from trainer.model.interop import (
    config_from_diffusers,
    config_to_diffusers,
    from_diffusers_state_dict,
    from_release_state_dict,
    infer_config,
    to_diffusers_state_dict,
    to_release_state_dict,
)

TOL = 1e-5


def tiny_cfg(**overrides) -> ModelConfig:
    kw = dict(
        name="tiny", latent_channels=3, patch_size=2, dim=64, num_blocks=2, num_heads=2, num_kv_heads=1,
        mlp_hidden=96, timestep_dim=32, text_dim=32, num_text_layers=3, text_num_heads=2, text_num_kv_heads=1,
        text_mlp_hidden=64, rope_axes=[8, 12, 12],
    )  # fmt: skip
    return ModelConfig(**{**kw, **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """All parameters random, the zero-initialised modulation tables and norm weights included,
    so a mapping that swapped or dropped any tensor shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        std = 0.2 if p.ndim == 1 or p.shape[-1] <= 16 else p.shape[-1] ** -0.5
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def inputs(cfg: ModelConfig, B=3, T=7, h=4, w=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, h * w, cfg.in_channels, generator=gen)
    text = torch.randn(B, T, cfg.num_text_layers, cfg.text_dim, generator=gen)
    t = torch.rand(B, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # partly padded
    mask[2, 2:] = False  # mostly padded
    return x, text, t, positions(T, h, w), mask


def diffusers_from_folder(folder) -> Krea2Transformer2DModel:
    """diffusers' own loading of a saved folder (its from_pretrained, accelerate installed)."""
    return Krea2Transformer2DModel.from_pretrained(folder).eval()


def max_diff(ours: K2DiT, theirs: Krea2Transformer2DModel, cfg: ModelConfig, use_mask=True) -> float:
    x, text, t, pos, mask = inputs(cfg)
    mask = mask if use_mask else None
    with torch.no_grad():
        a = ours(x, text, t, pos, mask)
        b = theirs(x, text, t, pos, mask).sample
    assert a.abs().max() > 0.1  # non-trivial outputs
    return (a - b).abs().max().item()


def test_diffusers_to_ours_matches_outputs():
    cfg = tiny_cfg()
    ref = randomize_(Krea2Transformer2DModel(**config_to_diffusers(cfg)))
    ours = K2DiT(cfg).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict(), cfg))
    assert max_diff(ours, ref, cfg, use_mask=True) < TOL
    assert max_diff(ours, ref, cfg, use_mask=False) < TOL


def test_ours_to_diffusers_matches_outputs():
    cfg = tiny_cfg(num_kv_heads=2, text_num_kv_heads=2)  # also the no-GQA path
    ours = randomize_(K2DiT(cfg), seed=5)
    ref = Krea2Transformer2DModel(**config_to_diffusers(cfg)).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    assert max_diff(ours, ref, cfg) < TOL


def test_release_layout_goes_through_diffusers_own_converter():
    cfg = tiny_cfg()
    ours = randomize_(K2DiT(cfg), seed=2)
    release = to_release_state_dict(ours.state_dict())
    assert release["blocks.0.mod.lin"].shape == (6 * cfg.dim,)  # the release stores the table flat
    assert "txtfusion.projector.weight" in release and "last.modulation.lin" in release

    prefixed = {"model.diffusion_model." + k: v.clone() for k, v in release.items()}  # as ComfyUI ships it
    ref = Krea2Transformer2DModel(**config_to_diffusers(cfg)).eval()
    ref.load_state_dict(convert_krea2_transformer_checkpoint_to_diffusers(prefixed), strict=True)
    assert max_diff(ours, ref, cfg) < TOL

    back = from_release_state_dict(release, cfg)
    assert back.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key


def test_save_diffusers_then_diffusers_loads_it_and_back(tmp_path):
    cfg = tiny_cfg()
    ours = randomize_(K2DiT(cfg), seed=3)
    folder = save_pretrained(ours, tmp_path / "transformer")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "Krea2Transformer2DModel"

    ref = diffusers_from_folder(folder)
    assert max_diff(ours, ref, cfg) < TOL

    loaded = load_pretrained(folder, patch_size=2)
    assert loaded.cfg == config_from_diffusers(config, patch_size=2, name=loaded.cfg.name)
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_sharded_diffusers_folder_loads_in_diffusers_and_here(tmp_path):
    cfg = tiny_cfg()
    ours = randomize_(K2DiT(cfg), seed=4)
    folder = save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    assert len(list(folder.glob("*.safetensors"))) > 1
    ref = diffusers_from_folder(folder)
    assert max_diff(ours, ref, cfg) < TOL
    loaded = load_pretrained(folder, cfg)
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_release_file_loads_without_a_config(tmp_path):
    cfg = tiny_cfg()
    ours = randomize_(K2DiT(cfg), seed=6)
    path = save_pretrained(ours, tmp_path / "k2.safetensors", fmt="release")
    loaded = load_pretrained(path)  # sizes inferred from shapes, patch 2 by default
    assert config_to_diffusers(loaded.cfg) == config_to_diffusers(cfg)
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_infer_config_recovers_the_release_architecture():
    from trainer.model.dit import build_on_meta

    cfg = ModelConfig()  # the released 12.8B sizes
    release = to_release_state_dict(build_on_meta(cfg).state_dict())
    assert config_to_diffusers(infer_config(release, "release")) == config_to_diffusers(cfg)


def test_mismatched_weights_raise_value_error_naming_keys(tmp_path):
    cfg = tiny_cfg()
    sd = to_diffusers_state_dict(randomize_(K2DiT(cfg)).state_dict())
    sd.pop("transformer_blocks.1.attn.to_gate.weight")
    sd["transformer_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="transformer_blocks.1.attn.to_gate.weight") as err:
        from_diffusers_state_dict(sd, cfg)
    assert "transformer_blocks.0.extra.weight" in str(err.value)

    full = to_diffusers_state_dict(K2DiT(cfg).state_dict())
    with pytest.raises(ValueError, match="shape mismatches"):
        from_diffusers_state_dict(full, tiny_cfg(mlp_hidden=128))

    folder = save_pretrained(K2DiT(cfg), tmp_path / "t")
    with pytest.raises(ValueError, match="intermediate_size"):
        load_pretrained(folder, tiny_cfg(mlp_hidden=128))
