"""A frozen vision encoder for representation alignment (iREPA targets).

The low-resolution stage aligns one DiT block's image tokens with the patch
features of the clean image from a self-supervised ViT (DINOv3 through
transformers' `DINOv3ViTModel`). The shard writer calls `encode` once per image and
stores `<key>.repa.npy` (N, Dv) with the grid in the sample's json; the trainer
never runs this model.

DINOv3's output sequence is `[CLS | registers | patches]` after the final
LayerNorm; only the patch tokens (row-major over the patch grid) are kept.
`VisionEncoder.tiny(seed)` builds the same class from a small random config, so
tests and the demo use the real code path without downloading weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel

# DINOv3's image processor normalises with ImageNet statistics (transformers'
# IMAGENET_DEFAULT_MEAN / _STD); a checkpoint's preprocessor_config.json overrides them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionEncoder:
    """images_BCHW in [-1, 1] -> patch features (B, N, Dv), N = gh * gw."""

    def __init__(self, model: DINOv3ViTModel, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        config = model.config
        patch = config.patch_size
        if isinstance(patch, (list, tuple)):
            if patch[0] != patch[1]:
                raise ValueError(f"non-square patches {patch} are not supported")
            patch = patch[0]
        if len(mean) != config.num_channels or len(std) != config.num_channels:
            raise ValueError(f"mean/std need {config.num_channels} entries, got {len(mean)} and {len(std)}")
        # eval() matters beyond dropout: in training mode DINOv3 jitters and rescales
        # its RoPE patch coordinates (an augmentation), which would make targets random.
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(patch)
        self.num_prefix_tokens = 1 + int(config.num_register_tokens)  # CLS + registers
        param = next(model.parameters())
        self.mean_13 = torch.tensor(mean, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)
        self.std_13 = torch.tensor(std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "VisionEncoder":
        """A DINOv3 ViT checkpoint folder (config.json + weights, optionally preprocessor_config.json)."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"vision encoder path {str(path)!r} is not a folder")
        model = DINOv3ViTModel.from_pretrained(str(path), dtype=dtype).to(device)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        # Read the statistics directly: DINOv3's image processor class needs torchvision,
        # which this environment cannot import, and we resize ourselves anyway.
        pre = path / "preprocessor_config.json"
        if pre.exists():
            cfg = json.loads(pre.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(model, mean, std)

    @classmethod
    def tiny(cls, seed: int = 0, patch_size: int = 4, dim: int = 32, num_register_tokens: int = 2) -> "VisionEncoder":
        """A 2-layer DINOv3 ViT with random weights (seeded, without moving the global RNG)."""
        config = DINOv3ViTConfig(
            patch_size=patch_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
            num_attention_heads=2, num_register_tokens=num_register_tokens, image_size=8 * patch_size,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DINOv3ViTModel(config)
        return cls(model)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (gh, gw) for an image of height x width pixels: each side is resized
        to the nearest multiple of the patch size (at least one patch)."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        return (max(1, round(height / self.patch_size)), max(1, round(width / self.patch_size)))

    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the model's normalised pixel_values at the grid's size.

        Same order as DINOv3's image processor: rescale to [0, 1], resize (bilinear,
        antialiased), normalise with mean/std.
        """
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != self.mean_13.shape[1]:
            raise ValueError(f"expected images (B, {self.mean_13.shape[1]}, H, W), got {tuple(images_BCHW.shape)}")
        x = (images_BCHW.to(self.device, torch.float32) + 1.0) / 2.0
        gh, gw = self.grid(*x.shape[-2:])
        size = (gh * self.patch_size, gw * self.patch_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean_13) / self.std_13

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) float32 patch tokens after the final LayerNorm, row-major over `grid(H, W)`."""
        pixels = self.preprocess(images_BCHW)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixels.to(dtype))
        return out.last_hidden_state[:, self.num_prefix_tokens:].float()
