"""iREPA: the alignment term trains a projector on a chosen block, stops when told, leaves the
flow loss at its usual scale, and never leaks into exported weights."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import Krea2Transformer2DModel
from safetensors.torch import load_file

from data.batch import Batch
from data.shapes import ShapesWorld
from data.vision import VisionEncoder
from trainer.config import ParallelConfig, StageConfig
from trainer.model import K2DiT, ModelConfig, load_pretrained, positions, save_pretrained
from trainer.model.interop import to_diffusers_state_dict, to_release_state_dict
from trainer.objectives import FlowObjective, FlowRepaObjective, build_objective
from trainer.parallel import Dist, parallelize
from trainer.repa import RepaConfig, RepaProjector, alignment_loss, spatial_normalize, target_grid

N_IMAGES, BATCH, STEPS = 32, 8, 40


def tiny_cfg() -> ModelConfig:
    # 32x32 RGB in pixel space, patch 4: an 8x8 token grid, the tiny DINOv3's grid at patch 4.
    return ModelConfig(name="tiny", latent_channels=3, patch_size=4, dim=64, num_blocks=3, num_heads=2,
                       num_kv_heads=1, mlp_hidden=128, timestep_dim=32, text_dim=32, num_text_layers=2,
                       text_num_heads=2, text_num_kv_heads=1, text_mlp_hidden=64, rope_axes=[8, 12, 12])


def stage(**repa) -> StageConfig:
    return StageConfig(objective="flow_repa", repa=RepaConfig(**{"weight": 0.5, "block": 1, "hidden": 64,
                                                                  "target_dim": 32, **repa}))


@pytest.fixture(scope="module")
def data():
    """Shapes images in [-1, 1], their tiny-DINOv3 patch features, and fixed random text features."""
    world = ShapesWorld(image_size=32, seed=0)
    images = np.stack([world.sample(i)[0] for i in range(N_IMAGES)])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    targets = VisionEncoder.tiny(seed=0).encode(images)  # (32, 64, 32)
    text = torch.randn(N_IMAGES, 4, 2, 32, generator=torch.Generator().manual_seed(0))
    return images, targets, text


def batch_at(data, step: int) -> Batch:
    images, targets, text = data
    ids = torch.arange(step * BATCH, (step + 1) * BATCH) % N_IMAGES
    return Batch(latents=images[ids], text=text[ids], text_mask=torch.ones(BATCH, 4, dtype=torch.bool),
                 sample_ids=ids + N_IMAGES * (step // (N_IMAGES // BATCH)), captions=[""] * BATCH,
                 repa=targets[ids])


def new_model(seed: int = 0) -> K2DiT:
    model = K2DiT(tiny_cfg())
    model.init_weights(seed)
    return model


def train(objective, data, steps: int = STEPS) -> tuple[K2DiT, list[dict[str, float]]]:
    model = new_model()
    objective.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for step in range(steps):
        objective.set_step(step)
        loss, metrics = objective.loss(model, batch_at(data, step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}})
    return model, history


def test_alignment_falls_and_flow_loss_keeps_its_scale(data):
    _, repa = train(build_objective(stage(), tiny_cfg(), seed=0), data)
    _, plain = train(FlowObjective(stage(), tiny_cfg(), seed=0), data)

    align = [h["repa_align"] for h in repa]
    first, last = align[0], np.mean(align[-5:])
    # -cos: ~0 for an untrained projector, towards -1 as block 1 + projector learn the targets'
    # spatial structure (measured: -0.05 -> -0.55)
    assert abs(first) < 0.15 and last < -0.45, (first, last)
    assert all(abs(h["loss"] - (h["flow"] + 0.5 * h["repa_align"])) < 1e-5 for h in repa)

    flow_repa = np.mean([h["flow"] for h in repa[-10:]])
    flow_plain = np.mean([h["loss"] for h in plain[-10:]])
    assert flow_plain < np.mean([h["loss"] for h in plain[:5]])  # the plain run learned too
    assert 1 / 1.5 < flow_repa / flow_plain < 1.5, (flow_repa, flow_plain)


def test_stop_step_switches_repa_off(data):
    objective = build_objective(stage(stop_step=3), tiny_cfg(), seed=0)
    assert isinstance(objective, FlowRepaObjective)
    model = new_model()
    objective.attach(model)
    projector = model.aux["repa"]
    plain = FlowObjective(stage(), tiny_cfg(), seed=0)
    batch = batch_at(data, 0)

    objective.set_step(2)  # still on
    loss, metrics = objective.loss(model, batch)
    loss.backward()
    assert set(metrics) == {"flow", "repa_align"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    model.zero_grad(set_to_none=True)

    objective.set_step(3)  # off from stop_step on: the flow loss alone, no projector forward
    calls = []
    handle = projector.register_forward_hook(lambda *args: calls.append(1))
    loss, metrics = objective.loss(model, batch)
    loss.backward()
    handle.remove()
    assert set(metrics) == {"flow"} and not calls
    assert all(p.grad is None for p in projector.parameters())
    assert torch.equal(loss, plain.loss(model, batch)[0])
    # weight 0 is off too, from the start
    zero = build_objective(stage(weight=0.0), tiny_cfg(), seed=0)
    zero.attach(model)
    assert set(zero.loss(model, batch)[1]) == {"flow"}


def test_spatial_normalisation_formula():
    # one sample, three patches, two channels
    x = torch.tensor([[[1.0, 10.0], [2.0, 10.0], [3.0, 40.0]]])
    y = spatial_normalize(x, eps=0.0)
    # channel 0: mean 2, population variance 2/3; channel 1: mean 20, variance 200
    expected = torch.tensor([[[-1.0, -10 / 200**0.5], [0.0, -10 / 200**0.5], [1.0, 20 / 200**0.5]]])
    expected[..., 0] /= (2 / 3) ** 0.5
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y.mean(1), torch.zeros(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(1, 2))
    # what is shared by every patch (the global component) is removed: the targets, and so the loss,
    # ignore a per-sample, per-channel offset and scale
    feats = torch.randn(2, 16, 8)
    shifted = feats * torch.rand(2, 1, 8).add(0.5) + torch.randn(2, 1, 8) * 5
    torch.testing.assert_close(spatial_normalize(shifted), spatial_normalize(feats), atol=1e-4, rtol=1e-4)
    pred = torch.randn(2, 16, 8)
    torch.testing.assert_close(alignment_loss(pred, shifted), alignment_loss(pred, feats), atol=1e-5, rtol=0)
    assert alignment_loss(spatial_normalize(feats), feats).item() == pytest.approx(-1.0)


def test_projector_grids_and_target_grid():
    projector = RepaProjector(dim=16, hidden=8, out_dim=5)
    tokens = torch.randn(2, 4 * 6, 16)
    assert projector(tokens, (4, 6), (4, 6)).shape == (2, 24, 5)
    assert projector(tokens, (4, 6), (2, 3)).shape == (2, 6, 5)  # area-averaged down
    assert projector(tokens, (4, 6), (8, 12)).shape == (2, 96, 5)  # bilinear up
    # area: each target cell is the mean of its 2x2 block of full-resolution predictions
    full = projector(tokens, (4, 6), (4, 6)).view(2, 4, 6, 5)
    small = projector(tokens, (4, 6), (2, 3)).view(2, 2, 3, 5)
    torch.testing.assert_close(small[:, 0, 0], full[:, :2, :2].mean((1, 2)), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        projector(tokens, (5, 5), (5, 5))
    assert target_grid(64, 8, 8) == (8, 8) and target_grid(18, 16, 8) == (6, 3) and target_grid(96, 4, 6) == (8, 12)
    with pytest.raises(ValueError, match="grid"):
        target_grid(7, 4, 4)


def test_hidden_block_output_survives_activation_checkpointing():
    model = new_model()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, cfg.in_channels, generator=gen)
    text = torch.randn(2, 4, 2, 32, generator=gen)
    t, pos = torch.rand(2, generator=gen), positions(4, 8, 8)
    with torch.no_grad():
        for block in model.blocks:  # non-zero gates, so every block changes its input
            block.mod.normal_(0, 0.5, generator=gen)
    captured = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, out: captured.append(out[:, 4:].detach()))
    v, hidden = model(x, text, t, pos, return_hidden_block=1)
    handle.remove()
    assert torch.equal(v, model(x, text, t, pos)) and torch.equal(hidden, captured[0])
    with pytest.raises(ValueError, match="return_hidden_block"):
        model(x, text, t, pos, return_hidden_block=3)
    # the same hidden states and gradients with every block wrapped for activation checkpointing
    parallelize(model, ParallelConfig(activation_checkpoint="full"), Dist(0, 1, 0, torch.device("cpu"), None))
    assert type(model.blocks[1]).__name__ == "CheckpointWrapper"
    v2, hidden2 = model(x, text, t, pos, return_hidden_block=1)
    torch.testing.assert_close(hidden2, hidden, atol=1e-6, rtol=0)
    hidden2.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["blocks.0._checkpoint_wrapped_module.attn.q.weight"].abs().sum() > 0
    assert grads["blocks.2._checkpoint_wrapped_module.mod"] is None  # after the tapped block: no gradient


def test_aux_modules_are_not_exported(tmp_path):
    objective = build_objective(stage(), tiny_cfg(), seed=0)
    model = new_model()
    objective.attach(model)
    assert any(k.startswith("aux.repa.") for k in model.state_dict())
    sd = model.state_dict()
    for foreign in (to_diffusers_state_dict(sd), to_release_state_dict(sd)):
        assert not any("aux" in k or "repa" in k for k in foreign)

    # diffusers folder: diffusers' own class loads it strictly, and so do we
    folder = save_pretrained(model, tmp_path / "transformer")
    theirs = Krea2Transformer2DModel.from_config(json.loads((folder / "config.json").read_text()))
    theirs.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    # release file
    release = save_pretrained(model, tmp_path / "k2.safetensors", fmt="release")
    assert not any("aux" in k for k in load_file(str(release)))
    plain = {k: v for k, v in sd.items() if not k.startswith("aux.")}
    for path in (folder, release):
        loaded = load_pretrained(path, tiny_cfg())
        assert len(loaded.aux) == 0 and loaded.state_dict().keys() == plain.keys()
        assert all(torch.equal(loaded.state_dict()[k], plain[k]) for k in plain)


def test_config_errors_name_the_key(data):
    with pytest.raises(ValueError, match="stage.repa.block"):
        build_objective(stage(block=3), tiny_cfg(), seed=0)
    objective = build_objective(stage(), tiny_cfg(), seed=0)
    model = new_model()
    batch = batch_at(data, 0)
    with pytest.raises(ValueError, match="attach"):
        objective.loss(model, batch)
    objective.attach(model)
    with pytest.raises(ValueError, match="batch.repa"):
        objective.loss(model, replace(batch, repa=None))
    # a stop_step cannot be honoured without the step: loud, not silently ignored
    stopping = build_objective(stage(stop_step=10), tiny_cfg(), seed=0)
    with pytest.raises(ValueError, match="set_step"):
        stopping.loss(model, batch_at(data, 0))
