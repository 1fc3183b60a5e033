"""Latent spaces: pixel identity, the Qwen-Image VAE's per-channel normalisation and the FLUX.2
VAE's BatchNorm normalisation, each against diffusers' own pipeline code."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import QwenImageImg2ImgPipeline

from data.latents import Flux2VAELatents, PixelLatents, QwenImageVAELatents, make_latents
from trainer.model import patchify

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


@pytest.fixture(scope="module")
def flux2_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, mid_block_add_attention=False)
    # Non-trivial statistics, as a trained VAE's bn has (a fresh one is mean 0, var 1).
    gen = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(torch.randn(16, generator=gen))
    vae.bn.running_var.copy_(torch.rand(16, generator=gen) * 3 + 0.2)
    path = tmp_path_factory.mktemp("flux2")
    vae.save_pretrained(str(path))  # a bare VAE folder
    return path


def test_pixel_latents_round_trip():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = PixelLatents(scale=2.0)
    z = latents.encode(images)
    assert (latents.channels, latents.downsample) == (3, 1) and z.shape == images.shape
    torch.testing.assert_close(z, images * 2)
    torch.testing.assert_close(latents.decode(z), images)
    assert make_latents("pixels").channels == 3
    with pytest.raises(ValueError, match="vae_path"):
        make_latents("qwen_image")
    with pytest.raises(ValueError, match="vae_path"):
        make_latents("flux2")
    with pytest.raises(ValueError, match="unknown latent space"):
        make_latents("sd3", "somewhere")


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
    assert torch.equal(z_BCHW, expected)
    # ... and decode(z / (1 / std) + mean) (QwenImagePipeline.__call__)
    with torch.no_grad():
        decoded = vae.decode(z_BCHW[:, :, None] / inv_std + mean).sample[:, :, 0].clamp(-1, 1)
    out = latents.decode(z_BCHW)
    assert out.shape == images.shape
    assert torch.equal(out, decoded)
    # the normalisation is applied, not skipped
    assert not torch.allclose(z_BCHW, mode[:, :, 0])


def test_qwen_image_posterior_sample_equals_the_img2img_pipeline(vae_dir):
    """QwenImageImg2ImgPipeline._encode_vae_image itself (it samples the posterior)."""
    latents = QwenImageVAELatents.from_pretrained(vae_dir, sample_posterior=True)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pipe = SimpleNamespace(vae=latents.vae)
    with torch.no_grad():
        theirs = QwenImageImg2ImgPipeline._encode_vae_image(pipe, images[:, :, None], torch.Generator().manual_seed(3))
    ours = latents.encode(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs[:, :, 0])


def test_vae_rejects_indivisible_sizes(vae_dir, flux2_vae_dir):
    latents = QwenImageVAELatents.from_pretrained(vae_dir)
    with pytest.raises(ValueError, match="divisible"):
        latents.encode(torch.zeros(1, 3, 30, 32))
    # FLUX.2 latents must also split into 2x2 patches: 16 px steps
    with pytest.raises(ValueError, match="divisible by 16"):
        Flux2VAELatents.from_pretrained(flux2_vae_dir).encode(torch.zeros(1, 3, 40, 32))


def test_flux2_vae_normalisation_equals_the_flux2_pipeline(flux2_vae_dir):
    latents = make_latents("flux2", str(flux2_vae_dir))
    assert isinstance(latents, Flux2VAELatents)
    assert (latents.channels, latents.downsample) == (4, 8)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z_BCHW = latents.encode(images)
    assert z_BCHW.shape == (2, 4, 4, 6) and z_BCHW.dtype == torch.float32

    # Flux2Pipeline._encode_vae_image itself: mode -> 2x2 patchify -> (z - bn mean) / sqrt(bn var + eps).
    vae = latents.vae
    pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        theirs_BPhw = Flux2Pipeline._encode_vae_image(pipe, images, generator=None)
    assert theirs_BPhw.shape == (2, 16, 2, 3)
    assert torch.equal(Flux2Pipeline._patchify_latents(z_BCHW), theirs_BPhw)
    # The DiT's own patch-2 tokens are FLUX.2's normalised packed tokens.
    assert torch.equal(patchify(z_BCHW, 2), Flux2Pipeline._pack_latents(theirs_BPhw))
    # the normalisation is applied, not skipped
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mode()
    assert not torch.allclose(z_BCHW, raw, atol=0.1)

    # Decode reverses it as Flux2Pipeline.__call__ does: z * sqrt(var + eps) + mean, unpatchify, decode.
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        expected = vae.decode(Flux2Pipeline._unpatchify_latents(theirs_BPhw * bn_std + bn_mean)).sample.clamp(-1, 1)
    out = latents.decode(z_BCHW)
    assert out.shape == images.shape
    assert torch.equal(out, expected)
    # patchify/unpatchify are inverses
    assert torch.equal(Flux2VAELatents.unpatchify(Flux2VAELatents.patchify(raw)), raw)


def test_pooled_pixel_latents_average_and_upsample():
    from data.latents import PixelLatents

    lat = PixelLatents(downsample=2)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    z = lat.encode(images)
    assert z.shape == (2, 3, 4, 4) and lat.channels == 3 and lat.downsample == 2
    torch.testing.assert_close(z[:, :, 1, 2], images[:, :, 2:4, 4:6].mean(dim=(-1, -2)))
    flat = torch.full((1, 3, 8, 8), 0.25)  # a flat image survives the round trip exactly
    torch.testing.assert_close(lat.decode(lat.encode(flat)), flat)
    assert lat.decode(z).shape == images.shape
