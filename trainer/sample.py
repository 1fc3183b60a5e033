"""Sample grids: fixed prompts and seeds, so grids from different steps compare."""

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from trainer.flow import euler_sample
from trainer.model import ModelConfig, patchify, positions, unpatchify


@torch.no_grad()
def generate(
    model: nn.Module,
    encode,
    decode,
    prompts: list[str],
    seeds: list[int],
    model_cfg: ModelConfig,
    latent_hw: tuple[int, int],
    steps: int,
    guidance: float,
    device: torch.device,
) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W). `encode(prompts)` gives (text, mask); `decode` maps latents to pixels."""
    was_training = model.training
    model.eval()
    p = model_cfg.patch_size
    H, W = latent_hw
    text, mask = encode(prompts)
    null_text, null_mask = encode([""] * len(prompts))
    text, mask, null_text, null_mask = (x.to(device) for x in (text, mask, null_text, null_mask))
    noise = torch.stack(
        [torch.randn(model_cfg.latent_channels, H, W, generator=torch.Generator().manual_seed(s)) for s in seeds]
    ).to(device)
    pos = positions(text.shape[1], H // p, W // p).to(device)

    def velocity(x_BLC, t_B, conditional):
        if conditional:
            return model(x_BLC, text, t_B, pos, mask).float()
        return model(x_BLC, null_text, t_B, pos, null_mask).float()

    x = euler_sample(velocity, patchify(noise, p), (H // p) * (W // p), steps, guidance)
    model.train(was_training)
    return decode(unpatchify(x, p, H, W)).clamp(-1, 1)


def grid_image(images: torch.Tensor, captions: list[str], cell: int = 128, cols: int = 4) -> np.ndarray:
    """Tiles images with their captions underneath; returns an RGB uint8 (H, W, 3) array."""
    n = images.shape[0]
    rows = (n + cols - 1) // cols
    pad = 28
    canvas = Image.new("RGB", (cols * cell, rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    for i in range(n):
        tile = Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + pad)
        canvas.paste(tile, (x, y))
        words, line, lines = captions[i].split(), "", []
        for word in words:  # wrap to two short lines
            if len(line) + len(word) > cell // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines[:2]), fill="black", spacing=1)
    return np.asarray(canvas)
