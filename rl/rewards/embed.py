"""Image embeddings from an open_clip image tower, shared by the artifact and diversity rewards.

`ImageEmbedder.load("ViT-B-32", pretrained="laion2b_s34b_b79k")` builds a tower the way
open_clip does (`create_model_and_transforms`, `pretrained` a tag or a checkpoint path),
keeps its image tower and evaluation transform, and embeds RGB uint8 images (B, H, W, 3)
as L2-normalised float32 (B, D) vectors, CLIP's `encode_image(normalize=True)`.

pretrained=None builds the architecture with random weights drawn from `init_seed`, so
every process asking for (model, None, seed) gets the same tower. The tests and the demo
use that with `TINY_MODELS`, configs this module registers with open_clip on first use the
way open_clip adds any config (`add_model_config` of a JSON file named after the model).
A random tower's embeddings still tell textures and colour shifts apart (see TINY_MODELS);
a real run names a trained tower.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

# open_clip architecture configs (embed_dim, vision_cfg, text_cfg: open_clip wants a text
# tower in every config, so each has a one-layer one). "k2-tiny-resnet": timm's resnet14t
# (a deep stem, four stages of one bottleneck each, 9 M parameters) on 64 px inputs, average
# pool, a linear projection to 512-d. Chosen for a random tower's embeddings: measured on
# the artifact head (shapes world, 32 px images resized to 64, 384 training / 128 held-out),
# open_clip's tiny ViTs (1-2 layers, width 64-128) reached 0.5-0.7 held-out accuracy per
# corruption kind, its ModifiedResNet (width 32, 64 px) 0.84-0.95, timm's MobileNetV3 and
# LCNet under 0.65, this tower 0.95-0.99, at ~3 ms an image on 2 CPU threads.
TINY_MODELS: dict[str, dict] = {
    "k2-tiny-resnet": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 64, "timm_model_name": "resnet14t", "timm_pool": "avg", "timm_proj": "linear"},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
    },
}
DEFAULT_MODEL = "k2-tiny-resnet"


def register_model_config(name: str, config: dict) -> None:
    """Make `name` an open_clip model with architecture `config` (a no-op if it already is).

    ValueError if open_clip already knows `name` with another config: a saved head or a
    run must not silently get a different tower under the same name.
    """
    config = json.loads(json.dumps(config))  # as open_clip reads it back from JSON (tuples -> lists)
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) != config:
            raise ValueError(f"open_clip already has a model {name!r} with another config: "
                             f"{open_clip.get_model_config(name)} (asked: {config})")
        return
    with tempfile.TemporaryDirectory() as folder:
        # open_clip keeps the configs it has read; the file is not needed once registered.
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


class ImageEmbedder:
    """An open_clip image tower and its evaluation transform: `embedder(images_BHWC)` ->
    L2-normalised float32 (B, D) on the CPU, `batch_size` images per forward."""

    def __init__(self, visual: torch.nn.Module, preprocess, settings: dict, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.visual = visual.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.settings = settings
        self.batch_size = batch_size

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | torch.device = "cpu",
             init_seed: int = 0, model_config: dict | None = None, batch_size: int = 64) -> "ImageEmbedder":
        """open_clip's `model` with weights `pretrained` (a tag, a checkpoint path, or None: random
        from `init_seed`). `model_config` registers `model` first (a saved head carries its
        tower's config); TINY_MODELS are registered when named."""
        if model_config is None and model in TINY_MODELS:
            model_config = TINY_MODELS[model]
        if model_config is not None:
            register_model_config(model, model_config)
        if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"open_clip has no model {model!r}: pick one of open_clip.list_models() "
                             f"or {sorted(TINY_MODELS)}")
        # open_clip builds on the CPU and then moves the model, so the CPU generator alone
        # decides a random tower; forked so the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        settings = {"model": model, "pretrained": pretrained, "init_seed": init_seed,
                    "model_config": open_clip.get_model_config(model),
                    "image_size": list(np.broadcast_to(clip.visual.image_size, 2).tolist()), "normalize": True}
        embedder = cls(clip.visual, preprocess, settings, batch_size=batch_size)  # the text tower goes with `clip`
        # The width as the tower computes it (ViT, ResNet and timm towers name it differently).
        settings["embed_dim"] = int(embedder(np.zeros((1, *settings["image_size"], 3), np.uint8)).shape[1])
        return embedder

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @torch.no_grad()
    def __call__(self, images_BHWC: np.ndarray) -> torch.Tensor:
        out = []
        for start in range(0, len(images_BHWC), self.batch_size):
            batch = [self.preprocess(Image.fromarray(image)) for image in images_BHWC[start:start + self.batch_size]]
            features = self.visual(torch.stack(batch).to(self.device))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        if not out:
            raise ValueError("no images to embed")
        return torch.cat(out)
