"""Latent spaces: pixel identity and the Qwen-Image VAE's per-channel normalisation."""

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from data.latents import PixelLatents, QwenImageVAELatents, make_latents

MEAN = [0.3, -0.7, 1.1, 0.05]
STD = [1.7, 0.6, 2.4, 1.2]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 latents_mean=MEAN, latents_std=STD)
    path = tmp_path_factory.mktemp("qwen_image") / "vae"  # laid out like a pipeline folder
    vae.save_pretrained(str(path))
    return path.parent


def test_pixel_latents_round_trip():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = PixelLatents(scale=2.0)
    z = latents.encode(images)
    assert (latents.channels, latents.downsample) == (3, 1) and z.shape == images.shape
    torch.testing.assert_close(z, images * 2)
    torch.testing.assert_close(latents.decode(z), images)
    assert make_latents("pixels").channels == 3
    with pytest.raises(ValueError):
        make_latents("qwen_image")  # no vae_path


def test_qwen_image_vae_normalisation_matches_pipeline_formula(vae_dir):
    latents = make_latents("qwen_image", str(vae_dir))
    assert isinstance(latents, QwenImageVAELatents)
    assert (latents.channels, latents.downsample) == (4, 8)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z_BCHW = latents.encode(images)
    assert z_BCHW.shape == (2, 4, 4, 4) and z_BCHW.dtype == torch.float32

    # diffusers' Qwen-Image pipelines: (mode - mean) * (1 / std) on a 5-D one-frame clip ...
    vae = latents.vae
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        mode = vae.encode(images[:, :, None]).latent_dist.mode()
        expected = ((mode - mean) * inv_std)[:, :, 0]
    torch.testing.assert_close(z_BCHW, expected, atol=1e-6, rtol=1e-5)
    # ... and decode(z / (1 / std) + mean)
    with torch.no_grad():
        decoded = vae.decode(z_BCHW[:, :, None] / inv_std + mean).sample[:, :, 0].clamp(-1, 1)
    out = latents.decode(z_BCHW)
    assert out.shape == images.shape
    torch.testing.assert_close(out, decoded, atol=1e-5, rtol=1e-4)
    # the normalisation is applied, not skipped
    assert not torch.allclose(z_BCHW, mode[:, :, 0])


def test_vae_rejects_indivisible_sizes(vae_dir):
    latents = QwenImageVAELatents.from_pretrained(vae_dir)
    with pytest.raises(ValueError, match="divisible"):
        latents.encode(torch.zeros(1, 3, 30, 32))
