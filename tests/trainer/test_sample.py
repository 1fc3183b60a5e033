"""Sample generation: fixed prompts and seeds give fixed images; grids land in the run dir."""

import os

import numpy as np
import torch
from PIL import Image

from tests.conftest import run_training
from trainer.model import K2DiT, ModelConfig
from trainer.sample import generate, grid_image

CFG = ModelConfig(
    name="t", latent_channels=3, patch_size=4, dim=64, num_blocks=2, num_heads=2, num_kv_heads=1, mlp_hidden=128,
    timestep_dim=64, text_dim=16, num_text_layers=2, text_num_heads=2, text_num_kv_heads=1, text_mlp_hidden=32,
    rope_axes=[8, 12, 12],
)  # fmt: skip


def _model():
    torch.manual_seed(0)
    model = K2DiT(CFG)
    for p in model.parameters():  # random everywhere, so the prompt matters
        torch.nn.init.normal_(p, std=0.05)
    return model


def _encode(prompts):
    feats = torch.stack([torch.full((6, 2, 16), float(len(p)) / 10) for p in prompts])
    mask = torch.tensor([[True] * (3 if p else 1) + [False] * (3 if p else 5) for p in prompts])
    return feats, mask


def _generate(model, prompts, seeds, guidance=2.0):
    return generate(model, _encode, lambda x: x, prompts, seeds, CFG, (16, 16), 4, guidance, torch.device("cpu"))


def test_generate_is_a_function_of_prompt_and_seed():
    model = _model()
    a = _generate(model, ["a red circle", "a blue square"], [0, 1])
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1
    torch.testing.assert_close(_generate(model, ["a red circle", "a blue square"], [0, 1]), a, rtol=0, atol=0)
    assert not torch.equal(_generate(model, ["a red circle", "a blue square"], [5, 1])[0], a[0])  # seed matters
    assert not torch.equal(_generate(model, ["a green triangle", "a blue square"], [0, 1])[0], a[0])  # prompt matters
    assert not torch.equal(_generate(model, ["a red circle", "a blue square"], [0, 1], guidance=0.0), a)


def test_grid_image_tiles_every_sample():
    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 3, 8, 8)
    grid = grid_image(images, [f"prompt {i}" for i in range(6)], cell=32, cols=4)
    assert grid.shape == (2 * (32 + 28), 4 * 32, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 0 and grid[32 + 28, 32, 0] == 255  # first tile black, sixth white


def test_training_writes_sample_grids(run_root):
    run_training("experiment=test_tiny", f"run_root={run_root}", "name=s", "stage.steps=2", "log.sample_every=2",
                 "log.sample_steps=2", "log.num_samples=4")
    path = os.path.join(run_root, "s", "samples", "step_00000002.png")
    image = np.asarray(Image.open(path))
    assert image.shape == (128 + 28, 4 * 128, 3)  # four prompts: one row of four
