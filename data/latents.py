"""Latent spaces the diffusion model trains in, behind one small interface.

    encode(images_BCHW in [-1, 1]) -> latents_BCHW      (no grad, float32)
    decode(latents_BCHW)           -> images_BCHW in [-1, 1]
    channels, downsample                                  (latent C and spatial factor)

`PixelLatents` is (scaled) pixel space, used by the 32x32 shapes demo where a VAE
would cost more than the model. `QwenImageVAELatents` is the Qwen-Image VAE that
Krea 2 trains on: 16 channels, 8x downsampling, normalised per channel with the
checkpoint's latents_mean / latents_std exactly as diffusers' Qwen-Image pipelines do.
`Flux2VAELatents` is the FLUX.2 VAE (32 channels, 8x), normalised with its BatchNorm
running statistics after a 2x2 patchify, exactly as diffusers' Flux2Pipeline does.
`ShapesAELatents` is the demo's own small autoencoder (data/autoencoder.py), trained on the
shapes world and normalised per channel the way the Qwen-Image VAE is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def images_from_uint8(images_NHWC: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], what `encode` takes."""
    return images_NHWC.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_to_uint8(images_NCHW: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> RGB uint8 (N, H, W, 3), rounded as a PNG holds it."""
    return ((images_NCHW.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _load_vae(class_name: str, path, device, dtype):
    """A diffusers VAE from its own folder or from a pipeline folder's `vae/`."""
    import diffusers

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"VAE path {str(path)!r} is not a folder")
    subfolder = "vae" if (path / "vae" / "config.json").exists() else None
    vae_cls = getattr(diffusers, class_name)
    return vae_cls.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype).to(device)


class PixelLatents:
    """Pixel space: latents = scale * image, optionally average-pooled by `downsample`.

    Decoding upsamples bilinearly. Pooling by 2 turns a 32×32 image into a
    16×16 latent, so with patch 2 a token carries 12 values instead of the 48
    of patch 4 over full-resolution pixels: a flow model must reproduce its
    input noise exactly in the velocity, and that is far quicker to learn in 12
    dimensions (the CPU demo depends on it).
    """

    def __init__(self, scale: float = 1.0, downsample: int = 1):
        if scale <= 0:
            raise ValueError(f"pixel latent scale must be > 0, got {scale}")
        if downsample < 1:
            raise ValueError(f"pixel latent downsample must be >= 1, got {downsample}")
        self.scale = scale
        self.channels = 3
        self.downsample = downsample

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = images_BCHW.float()
        if self.downsample > 1:
            x = torch.nn.functional.avg_pool2d(x, self.downsample)
        return x * self.scale

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        x = latents_BCHW.float() / self.scale
        if self.downsample > 1:
            x = torch.nn.functional.interpolate(x, scale_factor=self.downsample, mode="bilinear", align_corners=False)
        return x.clamp(-1, 1)


class QwenImageVAELatents:
    """diffusers' AutoencoderKLQwenImage with Qwen-Image's per-channel normalisation.

    encode: z = (mu - latents_mean) * (1 / latents_std)    (mu = posterior mode; or a sample)
    decode: x = vae.decode(z / (1 / latents_std) + latents_mean)
    Written with the reciprocal as diffusers writes it, so our latents are bitwise the pipeline's.
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
        std_1C11 = torch.tensor(config.latents_std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)
        self.inv_std_1C11 = 1.0 / std_1C11

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, sample_posterior: bool = False) -> "QwenImageVAELatents":
        """Load from a VAE folder, or from a full Qwen-Image pipeline folder (its `vae/` subfolder)."""
        vae = _load_vae("AutoencoderKLQwenImage", path, device, dtype)
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
        return (z_BCHW - self.mean_1C11) * self.inv_std_1C11

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z_BCHW = latents_BCHW.to(param.device).float() / self.inv_std_1C11 + self.mean_1C11
        images_BCTHW = self.vae.decode(z_BCHW.to(param.dtype)[:, :, None]).sample
        return images_BCTHW[:, :, 0].float().clamp(-1, 1)


class Flux2VAELatents:
    """diffusers' AutoencoderKLFlux2 with FLUX.2's BatchNorm normalisation.

    FLUX.2 normalises in patch space: the 32-channel latents are 2x2-patchified to
    128 channels ordered (c, dy, dx), and each of those is standardised with the VAE's
    `bn` running statistics (an affine-free BatchNorm2d that only ever tracked them):

        encode: z = (patchify(mu) - running_mean) / sqrt(running_var + batch_norm_eps)
        decode: x = vae.decode(unpatchify(z * sqrt(running_var + eps) + running_mean))

    We hand the trainer the normalised latents unpatchified again, (B, 32, H/8, W/8), so
    they bucket and patchify like any other latent space. K2DiT's patchify with patch 2
    packs channels in the same (c, dy, dx) order, so its tokens are exactly FLUX.2's
    normalised, packed tokens.
    """

    def __init__(self, vae, sample_posterior: bool = False):
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        config = vae.config
        self.channels = int(config.latent_channels)
        # diffusers' Flux2Pipeline: vae_scale_factor = 2 ** (len(block_out_channels) - 1).
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.patch = tuple(config.patch_size)
        if self.patch != (2, 2):
            raise ValueError(f"FLUX.2 normalises after a 2x2 patchify; this VAE's bn is sized for patch {self.patch}")
        bn = vae.bn
        if bn.running_mean is None or bn.running_mean.numel() != 4 * self.channels:
            raise ValueError(f"VAE bn must track {4 * self.channels} running statistics for {self.channels} channels")
        # Same expressions as the pipeline (sqrt of var + eps, then a division); kept in float32.
        self.mean_1P11 = bn.running_mean.detach().float().view(1, -1, 1, 1).clone()
        self.std_1P11 = torch.sqrt(bn.running_var.detach().float().view(1, -1, 1, 1) + config.batch_norm_eps)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, sample_posterior: bool = False) -> "Flux2VAELatents":
        """Load from a VAE folder, or from a full FLUX.2 pipeline folder (its `vae/` subfolder)."""
        vae = _load_vae("AutoencoderKLFlux2", path, device, dtype)
        return cls(vae, sample_posterior=sample_posterior)

    @staticmethod
    def patchify(z_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 4C, H/2, W/2), channels ordered (c, dy, dx) as FLUX.2 packs them."""
        B, C, H, W = z_BCHW.shape
        return z_BCHW.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)

    @staticmethod
    def unpatchify(z_BPHW: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`."""
        B, P, h, w = z_BPHW.shape
        return z_BPHW.view(B, P // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, P // 4, 2 * h, 2 * w)

    def _check_size(self, images_BCHW: torch.Tensor) -> None:
        height, width = images_BCHW.shape[-2:]
        # The latents must split into 2x2 patches, so the image must divide by 2x the VAE factor.
        factor = 2 * self.downsample
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not divisible by {factor} "
                             f"(VAE factor {self.downsample} x the 2x2 latent patch)")

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_size(images_BCHW)
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images_BCHW.to(param.device, param.dtype)).latent_dist
        # The pipeline's reference-image encoding uses the mode ("argmax").
        z_BCHW = (posterior.sample(generator) if self.sample_posterior else posterior.mode()).float()
        z_BPhw = (self.patchify(z_BCHW) - self.mean_1P11.to(z_BCHW.device)) / self.std_1P11.to(z_BCHW.device)
        return self.unpatchify(z_BPhw)

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z_BPhw = self.patchify(latents_BCHW.to(param.device).float())
        z_BCHW = self.unpatchify(z_BPhw * self.std_1P11.to(param.device) + self.mean_1P11.to(param.device))
        return self.vae.decode(z_BCHW.to(param.dtype)).sample.float().clamp(-1, 1)


class ShapesAELatents:
    """The shapes-world autoencoder (data/autoencoder.py) with per-channel normalisation.

    encode: z = (encoder(x) - latents_mean) * (1 / latents_std)
    decode: x = clamp(decoder(z / (1 / latents_std) + latents_mean), -1, 1)
    latents_mean / latents_std are the raw latents' statistics over the autoencoder's
    training images (its config.json), so encoded world images are about N(0, 1) per channel.
    """

    kind = "shapes_ae"  # what the shard index records (data.writer.latents_kind)

    def __init__(self, model, latents_mean: list[float], latents_std: list[float]):
        self.model = model.eval().requires_grad_(False)
        self.channels = int(model.cfg.channels)
        self.downsample = int(model.cfg.downsample)
        if len(latents_mean) != self.channels or len(latents_std) != self.channels:
            raise ValueError(f"the autoencoder has {self.channels} latent channels but {len(latents_mean)} "
                             f"latents_mean and {len(latents_std)} latents_std entries")
        device = next(model.parameters()).device
        self.mean_1C11 = torch.tensor(latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.inv_std_1C11 = 1.0 / torch.tensor(latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "ShapesAELatents":
        """Load a folder written by `python -m data.autoencoder` (ValueError if it holds none)."""
        from data.autoencoder import load_model

        if dtype != torch.float32:
            raise ValueError(f"the shapes autoencoder runs in float32, got dtype={dtype}")
        model, config = load_model(path, device)
        return cls(model, config["latents_mean"], config["latents_std"])

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        height, width = images_BCHW.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not divisible by the autoencoder factor "
                             f"{self.downsample}")
        z_BCHW = self.model.encode(images_BCHW.to(self.mean_1C11.device, torch.float32))
        return (z_BCHW - self.mean_1C11) * self.inv_std_1C11

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        z_BCHW = latents_BCHW.to(self.mean_1C11.device, torch.float32) / self.inv_std_1C11 + self.mean_1C11
        return self.model.decode(z_BCHW).clamp(-1, 1)


def make_latents(kind: str, vae_path: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pixel_downsample: int = 1):
    """The latent space named by a data config: "pixels", "qwen_image", "flux2" or "shapes_ae"
    (all but pixels need vae_path; for shapes_ae, a folder written by data/autoencoder.py)."""
    if kind == "pixels":
        return PixelLatents(downsample=pixel_downsample)
    vaes = {"qwen_image": QwenImageVAELatents, "flux2": Flux2VAELatents, "shapes_ae": ShapesAELatents}
    if kind not in vaes:
        raise ValueError(f"unknown latent space {kind!r}; expected 'pixels', 'qwen_image', 'flux2' or 'shapes_ae'")
    if vae_path is None:
        where = ("a folder written by `python -m data.autoencoder`" if kind == "shapes_ae"
                 else "a VAE folder or a pipeline folder with vae/")
        raise ValueError(f"latents={kind!r} needs vae_path ({where})")
    return vaes[kind].from_pretrained(vae_path, device=device, dtype=dtype)
