"""Latent spaces the diffusion model trains in, behind one small interface.

    encode(images_BCHW in [-1, 1]) -> latents_BCHW      (no grad, float32)
    decode(latents_BCHW)           -> images_BCHW in [-1, 1]
    channels, downsample                                  (latent C and spatial factor)

`PixelLatents` is (scaled) pixel space, used by the 32x32 shapes demo where a VAE
would cost more than the model. `QwenImageVAELatents` is the Qwen-Image VAE that
Krea 2 trains on: 16 channels, 8x downsampling, normalised per channel with the
checkpoint's latents_mean / latents_std exactly as diffusers' Qwen-Image pipelines do.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class PixelLatents:
    """Pixel space: latents = scale * image. 3 channels, no downsampling."""

    def __init__(self, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"pixel latent scale must be > 0, got {scale}")
        self.scale = scale
        self.channels = 3
        self.downsample = 1

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return images_BCHW.float() * self.scale

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return (latents_BCHW.float() / self.scale).clamp(-1, 1)


class QwenImageVAELatents:
    """diffusers' AutoencoderKLQwenImage with Qwen-Image's per-channel normalisation.

    encode: z = (mu - latents_mean) / latents_std     (mu = posterior mode; or a sample)
    decode: x = vae.decode(z * latents_std + latents_mean)
    The VAE is a video model: images pass through as one-frame clips (B, C, 1, H, W).
    """

    def __init__(self, vae, sample_posterior: bool = False):
        # The Qwen-Image edit pipeline encodes with the posterior mode ("argmax"); a sample
        # adds the VAE's (small) posterior noise, a mild augmentation some trainers prefer.
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        config = vae.config
        self.channels = int(config.z_dim)
        self.downsample = int(vae.spatial_compression_ratio)
        if len(config.latents_mean) != self.channels or len(config.latents_std) != self.channels:
            raise ValueError(f"VAE config has z_dim={self.channels} but {len(config.latents_mean)} latents_mean "
                             f"and {len(config.latents_std)} latents_std entries")
        param = next(vae.parameters())
        self.mean_1C11 = torch.tensor(config.latents_mean, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)
        self.std_1C11 = torch.tensor(config.latents_std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, sample_posterior: bool = False) -> "QwenImageVAELatents":
        """Load from a VAE folder, or from a full Qwen-Image pipeline folder (its `vae/` subfolder)."""
        from diffusers import AutoencoderKLQwenImage

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"VAE path {str(path)!r} is not a folder")
        subfolder = "vae" if (path / "vae" / "config.json").exists() else None
        vae = AutoencoderKLQwenImage.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype).to(device)
        return cls(vae, sample_posterior=sample_posterior)

    def _check_size(self, images_BCHW: torch.Tensor) -> None:
        height, width = images_BCHW.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not divisible by the VAE factor {self.downsample}")

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_size(images_BCHW)
        param = next(self.vae.parameters())
        x_BCTHW = images_BCHW.to(param.device, param.dtype)[:, :, None]
        posterior = self.vae.encode(x_BCTHW).latent_dist
        z_BCHW = (posterior.sample(generator) if self.sample_posterior else posterior.mode())[:, :, 0].float()
        return (z_BCHW - self.mean_1C11) / self.std_1C11

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z_BCHW = latents_BCHW.to(param.device).float() * self.std_1C11 + self.mean_1C11
        images_BCTHW = self.vae.decode(z_BCHW.to(param.dtype)[:, :, None]).sample
        return images_BCTHW[:, :, 0].float().clamp(-1, 1)


def make_latents(kind: str, vae_path: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """The latent space named by a data config: "pixels" or "qwen_image" (needs vae_path)."""
    if kind == "pixels":
        return PixelLatents()
    if kind == "qwen_image":
        if vae_path is None:
            raise ValueError("latents='qwen_image' needs vae_path (a Qwen-Image VAE or pipeline folder)")
        return QwenImageVAELatents.from_pretrained(vae_path, device=device, dtype=dtype)
    raise ValueError(f"unknown latent space {kind!r}; expected 'pixels' or 'qwen_image'")
