"""Exports load where they are meant to: a LoRA exported for diffusers runs in Krea2Pipeline's own
loader exactly as our merged model; full exports load back bit for bit; LoRA files round-trip
through every naming; the CLI names the bad key or path.

Fixture runs are written with the real checkpoint code, no training: a tiny K2DiT (random
tables, EMA ≠ live weights) and a LoRA "run" on top of it whose models.json names that base."""

import os
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import ROOT, train_env
from trainer.checkpoint import Checkpointer, TrainState, read_tensors
from trainer.config import CheckpointConfig, LoraConfig
from tests.trainer.test_interop import inputs
from trainer.export import export
from trainer.lora_io import parse_lora
from trainer.lora import adapter_layers, apply_lora, merge_lora
from trainer.lora_io import read_lora, write_lora
from trainer.model import K2DiT, ModelConfig, load_pretrained
from trainer.model.interop import to_release_state_dict
from trainer.optim import EMA
from trainer.parallel import Dist
from trainer.weights import lora_adapters, load_weights

TOL = 1e-5
LORA = LoraConfig(rank=4, alpha=8.0, targets=["attn.q", "attn.v", "attn.out", "mlp.w_down"], text_fusion=True)


def tiny_cfg() -> ModelConfig:
    with open(os.path.join(ROOT, "configs/model/tiny.yaml")) as f:
        return ModelConfig(**yaml.safe_load(f))


@torch.no_grad()
def tiny_model(cfg: ModelConfig, seed: int = 0) -> K2DiT:
    """init_weights, then the zero-initialised tables (modulation, time projection, final
    linear, biases, norm scales) made small and random, so the output is non-trivial."""
    model = K2DiT(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for p in model.parameters():
        if not p.any():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@torch.no_grad()
def save_checkpoint(run_dir: str, model: torch.nn.Module, info: dict, seed: int) -> str:
    """A run folder with one checkpoint (step 10) of `model`, through Checkpointer.save; the EMA
    differs from the live weights, so a mix-up of the two shows."""
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), CheckpointConfig(), d)
    ema = EMA(model, 0.99)
    gen = torch.Generator().manual_seed(seed)
    for s in ema.shadow:
        s.add_(0.02 * torch.randn(s.shape, generator=gen))
    trainables = {"model": SimpleNamespace(module=model, optimizer=None, ema=ema)}
    ckpt.save(TrainState(step=10, samples_seen=80), trainables, {}, {"model": info})
    return ckpt.path(10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"base": full-weights run dir, "base_step", "lora": LoRA run dir, "lora_step"}."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg()
    base = tiny_model(cfg, seed=0)
    base_step = save_checkpoint(str(root / "base"), base,
                                {"config": asdict(cfg), "lora": None, "base": None, "frozen": False}, seed=1)

    model = K2DiT(cfg)
    model.load_state_dict(read_tensors(base_step, "ema"))  # the LoRA trains on the base's EMA weights
    apply_lora(model, LORA)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    lora_info = {"config": asdict(cfg),
                 "lora": {"rank": LORA.rank, "alpha": LORA.alpha, "targets": LORA.targets, "text_fusion": True},
                 "base": {"source": base_step, "weights": "ema"}, "frozen": False}
    lora_step = save_checkpoint(str(root / "lora"), model, lora_info, seed=3)
    return SimpleNamespace(root=root, cfg=cfg, base=str(root / "base"), base_step=base_step,
                           lora=str(root / "lora"), lora_step=lora_step)


def reference_merged(runs, which="ema") -> K2DiT:
    """Our merged model, built by hand: base EMA weights + alpha/rank · B A of the run's adapters."""
    model = K2DiT(runs.cfg).eval()
    model.load_state_dict(read_tensors(runs.base_step, "ema"))
    merge_lora(model, lora_adapters(runs.lora_step, which), LORA.alpha / LORA.rank)
    return model


def deltas(sd: dict, factor: float) -> dict[str, torch.Tensor]:
    return {m: factor * (B.double() @ A.double()) for m, (A, B) in adapter_layers(sd).items()}


# ---------------------------------------------------------------- (a) diffusers' own LoRA loader


def test_lora_diffusers_export_runs_in_krea2_pipeline_like_our_merged_model(runs, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    base_dir = export(runs.base, "diffusers", str(tmp_path / "base_transformer"))
    lora_file = export(runs.lora, "lora-diffusers", str(tmp_path / "lora.safetensors"))
    with safe_open(str(lora_file), framework="pt") as fh:
        keys = set(fh.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.text_fusion.refiner_blocks.1.attn.to_out.0.lora_B.weight" in keys

    transformer = Krea2Transformer2DModel.from_pretrained(base_dir).eval()
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer, patch_size=runs.cfg.patch_size)
    x, text, t, pos, mask = inputs(runs.cfg)
    with torch.no_grad():
        before = pipe.transformer(x, text, t, pos, mask).sample
        pipe.load_lora_weights(str(lora_file))  # scale 1
        theirs = pipe.transformer(x, text, t, pos, mask).sample
        ours = reference_merged(runs)(x, text, t, pos, mask)
        via_load_weights = load_weights(runs.lora)(x, text, t, pos, mask)  # a LoRA run resolved onto its base

    assert (ours - before).abs().max() > 0.05  # the adapter really changes the output
    assert (ours - theirs).abs().max().item() < TOL
    assert (via_load_weights - ours).abs().max().item() < TOL


# ---------------------------------------------------------------- (b) full exports, bit for bit


@pytest.mark.parametrize("which", ["ema", "model"])
def test_release_and_diffusers_exports_load_back_bit_identical(runs, tmp_path, which):
    saved = read_tensors(runs.base_step, which)
    folder = export(runs.base, "diffusers", str(tmp_path / "diffusers"), which=which)
    release = export(runs.base_step, "release", str(tmp_path / "k2.safetensors"), which=which)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    for path in (folder, release):
        loaded = load_pretrained(path).state_dict()
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), (path, key)

    # a diffusers folder as the source: conversion to the release layout changes no bit either
    converted = export(str(folder), "release", str(tmp_path / "converted.safetensors"))
    with safe_open(str(converted), framework="pt") as a, safe_open(str(release), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_bfloat16_export_and_merged_lora_export(runs, tmp_path):
    bf16 = export(runs.base, "release", str(tmp_path / "bf16.safetensors"), dtype="bfloat16")
    loaded = load_pretrained(bf16).state_dict()
    for key, value in read_tensors(runs.base_step, "ema").items():
        assert loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], value.bfloat16()), key

    merged = export(runs.lora, "diffusers", str(tmp_path / "merged"), merge_lora=True)
    loaded = load_pretrained(merged).state_dict()
    for key, value in reference_merged(runs).state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_lora_run_and_full_run_refuse_the_wrong_export(runs, tmp_path):
    with pytest.raises(ValueError, match="--merge-lora") as err:
        export(runs.lora, "diffusers", str(tmp_path / "x"))
    assert "--to lora-" in str(err.value)
    with pytest.raises(ValueError, match="full-weights run, not a LoRA run"):
        export(runs.base, "lora-comfyui", str(tmp_path / "x.safetensors"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.safetensors")


# ---------------------------------------------------------------- (c) LoRA files round-trip


@pytest.mark.parametrize("to, fmt", [("lora", "k2train"), ("lora-comfyui", "comfyui"), ("lora-diffusers", "diffusers")])
def test_lora_files_round_trip_to_the_same_delta(runs, tmp_path, to, fmt):
    adapters = lora_adapters(runs.lora_step, "ema")
    want = deltas(adapters, LORA.alpha / LORA.rank)
    path = export(runs.lora, to, str(tmp_path / f"{fmt}.safetensors"))
    sd, factor = read_lora(path, runs.cfg)
    got = deltas(sd, factor)
    assert got.keys() == want.keys() and len(want) == 2 * 3 * 4  # (2 blocks + 2 + 2 text blocks) x 4 targets
    for module in want:
        assert (got[module] - want[module]).abs().max().item() < 1e-6, module

    with safe_open(str(path), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    if fmt == "k2train":
        assert "blocks.0.attn.q.lora_A.weight" in keys
        assert (meta["k2train.lora_alpha"], meta["k2train.lora_rank"]) == ("8.0", "4")
        key = "blocks.0.attn.q.lora_B.weight"
        assert factor == 2.0 and torch.equal(sd[key], adapters[key])  # tensors as trained, alpha/rank apart
    if fmt == "comfyui":
        # ComfyUI maps `diffusion_model.<release name>` (its model's state-dict key less `.weight`) for any model
        release_keys = {"diffusion_model." + k for k in to_release_state_dict(K2DiT(runs.cfg).state_dict())}
        modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
        assert "diffusion_model.blocks.0.attn.wq" in modules
        assert "diffusion_model.txtfusion.layerwise_blocks.0.mlp.down" in modules
        assert all(m + ".weight" in release_keys for m in modules)
        assert {k[len(m) + 1:] for k in keys for m in [k.rsplit(".", 2 if k.endswith(".weight") else 1)[0]]} == {
            "lora_down.weight", "lora_up.weight", "alpha"}
        with safe_open(str(path), framework="pt") as fh:
            assert fh.get_tensor("diffusion_model.blocks.1.attn.wv.alpha").item() == 8.0
    if fmt == "diffusers":
        assert factor == 1.0  # alpha/rank baked into B


def test_comfyui_layers_at_different_alphas_fold_into_b(runs, tmp_path):
    adapters = lora_adapters(runs.lora_step, "ema")
    path = write_lora(adapters, LORA.alpha, LORA.rank, tmp_path / "c.safetensors", "comfyui")
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["diffusion_model.blocks.0.attn.wq.alpha"] = torch.tensor(2.0)  # this layer at 2/4, the rest at 8/4
    save_file(tensors, str(path))
    sd, factor = read_lora(path, runs.cfg)
    got, want = deltas(sd, factor), deltas(adapters, LORA.alpha / LORA.rank)
    assert (got["blocks.0.attn.q"] - want["blocks.0.attn.q"] / 4).abs().max() < 1e-6
    assert (got["blocks.1.attn.q"] - want["blocks.1.attn.q"]).abs().max() < 1e-6


def test_read_lora_rejects_bad_files_naming_file_and_key(runs, tmp_path):
    cfg = runs.cfg
    adapters = lora_adapters(runs.lora_step, "ema")
    with pytest.raises(ValueError, match="does not exist"):
        read_lora(tmp_path / "nope.safetensors", cfg)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        read_lora(junk, cfg)

    half = {k: v for k, v in adapters.items() if k != "blocks.1.attn.v.lora_B.weight"}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match=r"'blocks\.1\.attn\.v\.lora_A\.weight' has no lora_B weight"):
        read_lora(tmp_path / "half.safetensors", cfg)

    stranger = {**adapters, "blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 64)}
    save_file(stranger, str(tmp_path / "stranger.safetensors"))
    with pytest.raises(ValueError, match=r"stranger\.safetensors.*'blocks\.0\.attn\.qkv\.lora_A\.weight' is not"):
        read_lora(tmp_path / "stranger.safetensors", cfg)

    path = write_lora(adapters, 8.0, 4, tmp_path / "comfy.safetensors", "comfyui")
    bigger = ModelConfig(**{**asdict(cfg), "mlp_hidden": 256})
    bad_key = r"'diffusion_model\.blocks\.0\.mlp\.down\.lora_down\.weight' \(4, 128\)"
    with pytest.raises(ValueError, match=bad_key) as err:
        read_lora(path, bigger)
    assert "(64, 256)" in str(err.value)  # the model's weight shape


# ---------------------------------------------------------------- (d) the CLI's errors


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = train_env()
    return subprocess.run([sys.executable, "-m", "trainer.export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_names_the_key_of_a_lora_that_does_not_fit_and_the_missing_path(runs, tmp_path):
    bad = {k: v for k, v in lora_adapters(runs.lora_step, "ema").items()}
    bad["blocks.0.attn.q.lora_A.weight"] = torch.zeros(4, 65)  # the linear is 64 -> 64
    write_lora(bad | {"blocks.0.attn.q.lora_B.weight": torch.zeros(64, 4)}, 8.0, 4, tmp_path / "bad.safetensors",
               "k2train")
    out = tmp_path / "styled"
    proc = run_cli(runs.base, "--to", "diffusers", "--lora", f"{tmp_path / 'bad.safetensors'}:0.5", "--out", str(out))
    assert proc.returncode != 0
    assert "'blocks.0.attn.q.lora_A.weight' (4, 65)" in proc.stderr and "(64, 64)" in proc.stderr, proc.stderr
    assert "bad.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "styled.partial").exists()

    missing = tmp_path / "no_such_run"
    proc = run_cli(str(missing), "--to", "release", "--out", str(tmp_path / "k2.safetensors"))
    assert proc.returncode != 0
    assert f"{missing} does not exist" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli(runs.lora, "--to", "lora-comfyui", "--weights", "model", "--out", str(tmp_path / "c.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'c.safetensors'} ({3 * 2 * 3 * 4} tensors," in proc.stdout  # down, up, alpha per layer


def test_lora_argument_parsing():
    assert parse_lora("a/b.safetensors:0.75") == ("a/b.safetensors", 0.75)
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora("c:/x.safetensors") == ("c:/x.safetensors", 1.0)
