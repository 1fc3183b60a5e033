"""Infinite, exactly resumable batches of the shapes world for one data-parallel rank.

Sample ids are global and consumed in order. Global micro-batch g holds ids
[g*B*W, (g+1)*B*W) (B = per-rank batch, W = world size) and rank r takes the
contiguous slice [g*B*W + r*B, g*B*W + (r+1)*B). So what the job as a whole sees
depends only on the global batch B*W: one process at B=8 sees exactly the samples
of two processes at B=4, concatenated in rank order. The only state is the number
of samples consumed, which makes resuming (even on a different world size with the
same global batch) a matter of setting one counter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data.batch import Batch
from data.config import DataConfig
from data.latents import make_latents
from data.shapes import ShapesWorld
from data.text import TextEncoder, build_tiny_encoder

# Seeds a caption-dropout stream distinct from the world's ([seed, index]) one.
_DROPOUT_STREAM = 0xD20F


class ShapesLoader:
    """`next(loader) -> Batch` of `batch_size` samples for `rank` of `world_size`; never ends."""

    def __init__(self, cfg: DataConfig, encoder: TextEncoder, latents, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        if cfg.name != "shapes":
            raise ValueError(f"ShapesLoader serves data.name='shapes', got {cfg.name!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if encoder.max_len != cfg.text_len:
            raise ValueError(f"encoder keeps {encoder.max_len} prompt tokens but cfg.text_len={cfg.text_len}")
        self.cfg = cfg
        self.encoder = encoder
        self.latents = latents
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.world = ShapesWorld(image_size=cfg.image_size, seed=cfg.seed)
        self.micro_step = 0  # global micro-batches consumed by the whole job
        # The caption set is finite (~1.1k), so features are computed once per caption
        # and kept on the CPU: (features_TKD, mask_T).
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __iter__(self) -> "ShapesLoader":
        return self

    def caption_dropped(self, sample_id: int) -> bool:
        """Whether sample_id's caption becomes "": a pure function of (seed, sample_id)."""
        if self.cfg.caption_dropout <= 0.0:
            return False
        rng = np.random.default_rng([self.cfg.seed, int(sample_id), _DROPOUT_STREAM])
        return bool(rng.random() < self.cfg.caption_dropout)

    def text_features(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_BTKD, mask_BT) on the CPU, from the per-caption cache."""
        for caption in captions:
            if caption not in self._text_cache:
                # One caption per forward pass: a row's floating-point result must not depend
                # on which other captions shared its batch, or resumed / re-sharded runs would
                # see slightly different features for the same sample.
                feats_1TKD, mask_1T = self.encoder.encode([caption])
                self._text_cache[caption] = (feats_1TKD[0].cpu(), mask_1T[0].cpu())
        feats, masks = zip(*(self._text_cache[c] for c in captions))
        return torch.stack(feats), torch.stack(masks)

    def __next__(self) -> Batch:
        start = self.micro_step * self.global_batch_size + self.rank * self.batch_size
        sample_ids = list(range(start, start + self.batch_size))
        images, captions = zip(*(self.world.sample(i) for i in sample_ids))
        captions = ["" if self.caption_dropped(i) else c for i, c in zip(sample_ids, captions)]
        images_BHWC = torch.from_numpy(np.stack(images))
        images_BCHW = images_BHWC.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents_BCHW = self.latents.encode(images_BCHW).cpu()
        text_BTKD, mask_BT = self.text_features(captions)
        self.micro_step += 1
        return Batch(latents=latents_BCHW, text=text_BTKD, text_mask=mask_BT,
                     sample_ids=torch.tensor(sample_ids, dtype=torch.int64), captions=captions)

    def state_dict(self) -> dict[str, int]:
        return {"samples_seen": self.micro_step * self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "samples_seen" not in state:
            raise ValueError(f"loader state needs 'samples_seen', got keys {sorted(state)}")
        samples_seen = int(state["samples_seen"])
        if samples_seen < 0 or samples_seen % self.global_batch_size:
            raise ValueError(
                f"cannot resume at samples_seen={samples_seen} with global batch {self.global_batch_size} "
                f"(batch_size={self.batch_size} x world_size={self.world_size}): it must be a non-negative "
                f"multiple of the global batch; keep batch_size * world_size as in the checkpointed run")
        self.micro_step = samples_seen // self.global_batch_size


# Bump when build_tiny_encoder changes what it makes: cached copies of older builds are then ignored.
TINY_ENCODER_VERSION = 4


def tiny_encoder_cache() -> Path:
    """Where built tiny encoders are kept for reuse: $K2_CACHE_DIR, else ~/.cache/k2train."""
    root = os.environ.get("K2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "k2train")
    return Path(root) / "tiny_encoders"


def _publish(path: Path, fill) -> None:
    """Make folder `path` by `fill(tmp)` into a private temp folder and an atomic rename.

    rename is atomic, so `path` is either absent or complete; a loser of a race (rename
    onto a non-empty folder fails) throws its copy away, which loses nothing because
    every filler makes the same contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        fill(tmp)
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_encoder(path: str | os.PathLike, texts: list[str], progress=print) -> str:
    """Build the tiny text encoder at `path` once; later (or concurrent) callers reuse it.

    Building trains it for ~30 s (`build_tiny_encoder`), so each distinct build (texts,
    seed, version) is also kept in `tiny_encoder_cache()` and later runs copy it from
    there: every run folder still holds its own copy.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return str(path)
    key = hashlib.sha256(json.dumps({"texts": sorted(set(texts)), "seed": 0, "version": TINY_ENCODER_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:20]
    cached = tiny_encoder_cache() / key

    def build(tmp):
        t0 = time.perf_counter()
        progress(f"building the tiny text encoder ({len(set(texts))} texts; trained for up to ~30 s) for {path}")
        build_tiny_encoder(tmp, texts, seed=0)
        report = json.loads((Path(tmp) / "training.json").read_text())
        progress(f"tiny text encoder built in {time.perf_counter() - t0:.0f} s: {report['steps']} steps, "
                 f"slot accuracy {report['slot_accuracy']:.1%}")

    if not (cached / "config.json").exists():
        try:
            _publish(cached, build)
        except OSError:  # an unwritable cache: build in place instead
            _publish(path, build)
            return str(path)
    _publish(path, lambda tmp: shutil.copytree(cached, tmp, dirs_exist_ok=True))
    return str(path)


class ShapesData(NamedTuple):
    loader: ShapesLoader
    encoder: TextEncoder
    latents: object  # PixelLatents | QwenImageVAELatents
    world: ShapesWorld


def build_shapes_data(cfg: DataConfig, cache_dir: str | os.PathLike, batch_size: int, rank: int = 0,
                      world_size: int = 1, device: str | torch.device = "cpu") -> ShapesData:
    """Everything the trainer needs for the shapes demo: ShapesData(loader, encoder, latents, world).

    The text encoder is `cfg.encoder_path` if set, else the tiny one cached in
    `cache_dir/text_encoder` (built on first use, by whichever rank gets there first).
    """
    if cfg.name != "shapes":
        raise ValueError(f"build_shapes_data builds data.name='shapes', got {cfg.name!r}")
    world = ShapesWorld(image_size=cfg.image_size, seed=cfg.seed)
    encoder_path = cfg.encoder_path
    if encoder_path is None:
        # The tiny encoder is a fixed artifact (seed 0, every caption of the world), shared
        # by runs with different data seeds.
        encoder_path = ensure_tiny_encoder(Path(cache_dir) / "text_encoder", world.all_captions())
    encoder = TextEncoder.from_pretrained(encoder_path, layers=cfg.text_layers, max_len=cfg.text_len, device=device)
    latents = make_latents(cfg.latents, cfg.vae_path, device=device, pixel_downsample=cfg.pixel_downsample)
    loader = ShapesLoader(cfg, encoder, latents, batch_size, rank, world_size)
    return ShapesData(loader, encoder, latents, loader.world)
