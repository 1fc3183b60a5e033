"""The frozen DINOv3 vision encoder that gives iREPA targets: patch tokens only, equal to a
direct transformers computation."""

import json

import pytest
import torch
from transformers import DINOv3ViTModel

from data.vision import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder


def direct(model: DINOv3ViTModel, images_BCHW: torch.Tensor, mean, std) -> torch.Tensor:
    """transformers' DINOv3 on [0, 1]-rescaled, mean/std-normalised pixels: the full output sequence."""
    pixels = ((images_BCHW + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


def test_patch_tokens_only_and_equal_to_transformers():
    enc = VisionEncoder.tiny(seed=0)  # patch 4, width 32, 2 registers
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    feats = enc.encode(images)
    assert enc.grid(32, 48) == (8, 12) and enc.dim == 32
    assert feats.shape == (2, 8 * 12, 32) and feats.dtype == torch.float32
    full = direct(enc.model, images, IMAGENET_MEAN, IMAGENET_STD)
    assert full.shape[1] == 1 + 2 + 96  # CLS + registers + patches ...
    torch.testing.assert_close(feats, full[:, 3:], atol=1e-6, rtol=1e-5)  # ... of which the patches are kept
    # the dropped tokens are not patches: no output row equals the CLS or a register token
    for prefix in full[0, :3]:
        assert not torch.isclose(feats[0], prefix[None], atol=1e-4).all(-1).any()
    # a patch token depends on its own pixels: changing the top-left patch changes token 0 most
    edited = images.clone()
    edited[:, :, :4, :4] = -images[:, :, :4, :4]
    delta = (enc.encode(edited) - feats).norm(dim=-1)
    assert delta[:, 0].min() > delta[:, 1:].max(dim=1).values.max() * 0.5


def test_sizes_round_to_the_patch_grid():
    enc = VisionEncoder.tiny(seed=0)
    assert enc.grid(30, 34) == (8, 8) and enc.grid(2, 2) == (1, 1)
    images = torch.rand(1, 3, 30, 34) * 2 - 1
    feats = enc.encode(images)
    assert feats.shape == (1, 64, 32)
    # the same as resizing to 32x32 first (bilinear, antialiased) and encoding that
    resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(feats, enc.encode(resized), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="expected images"):
        enc.encode(torch.zeros(1, 1, 32, 32))


def test_from_pretrained_reads_weights_and_normalisation(tmp_path):
    tiny = VisionEncoder.tiny(seed=3)
    tiny.model.save_pretrained(str(tmp_path))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.5, 1.0]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    enc = VisionEncoder.from_pretrained(tmp_path)
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = enc.encode(images)
    torch.testing.assert_close(feats, direct(enc.model, images, mean, std)[:, 3:], atol=1e-6, rtol=1e-5)
    # deterministic (eval mode: DINOv3 randomises its RoPE coordinates only in training mode)
    assert torch.equal(feats, enc.encode(images))
    # different seeds are different encoders
    assert not torch.allclose(VisionEncoder.tiny(seed=0).encode(images), VisionEncoder.tiny(seed=3).encode(images))
    with pytest.raises(ValueError, match="not a folder"):
        VisionEncoder.from_pretrained(tmp_path / "missing")
