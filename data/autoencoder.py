"""A small convolutional autoencoder for the shapes world: the demo's learned latent space.

    python -m data.autoencoder --out /tmp/ae32                    # 32 px -> 4x8x8 latents, ~1.5 min
    python -m data.autoencoder --out /tmp/ae64 --resolution 64    # 64 px -> 4x16x16
    python -m data.autoencoder --out /tmp/ae64x8 --resolution 64 --downsample 8 --channels 8 \
        --width 32 --batch-size 16 --steps 3000                   # 64 px -> 8x8x8

The real model trains in a VAE's latent space; the CPU demo's pixel latents (the image
average-pooled to 16x16) keep a triangle, a square and a circle a few pixels each. This
autoencoder is trained on the world's own images, pretraining (`ShapesWorld`) and
fine-tuning (`ConceptWorld`, so pink reconstructs before any stage teaches it), and saved
as a folder that `data.latents.ShapesAELatents` (latents kind "shapes_ae") loads like any
other VAE; a folder that already holds one with the same settings is reused as it is:

    config.json          _class_name, architecture, settings (AEConfig), latents_mean /
                         latents_std (per channel, over the training images), training
                         time, the measured reconstruction
    model.safetensors    encoder and decoder weights
    reconstruction.png   held-out originals (top rows) over their reconstructions

Architecture: a `patch` x `patch` pixel-unshuffle stem, then stride-2 conv levels (each
with a residual conv) down to `downsample`, widths doubling from `width` up to
`max_width`, a 1x1 conv to `channels`; the decoder mirrors it with nearest-neighbour
upsampling and a pixel-shuffle head. The last conv is linear and `decode` clamps to
[-1, 1] (as diffusers' pipelines do): under tanh the palette's saturated values
(255 -> +1) would need ever larger pre-activations.

Training choices, each measured (on a GPU sweep of shorter runs, 512 held-out images):
  - Deterministic, no KL. The latents get Gaussian noise of `latent_noise` times their
    per-channel batch std (detached) during training: relative, because an absolute
    noise is defeated by the encoder scaling its latents up (an L2 penalty would then
    have to pin the scale, a second weight to tune). In normalised units it is noise of
    0.1, about a sampler's residual error at the end of a flow. At 0.1 the clean
    agreement did not drop (80.3% vs 79.7% without) and under 0.1 latent noise at
    decode time it held better (75.6% vs 74.8%; 74.2% vs 70.1% in another setting);
    0.2 cost 20 points of clean agreement.
  - Every verifier disagreement after the round trip was a small square read as a
    circle: a few edge pixels that change palette class round its corners. The loss is
    (MSE + `l1_weight` * L1) weighted by 1 + `edge_weight` on edges (see `_edge_weights`):
    weight 10 gained 3 to 5 points of agreement at 32 px, 4 at 64 px.
  - Random crops of 4 latent cells (16 px at 4x) instead of whole images: a quarter of
    the pixels a step, so about three times the steps in the same CPU time, which beat
    whole images at equal time. L1 lowers the MAE (3.0 -> 2.1); agreement is the same.
  - Adam with warmup and a cosine decay, gradient clipping (one unclipped 64 px run
    collapsed to a constant image), channels_last (~25% faster on a CPU), a fixed seed
    and a fixed pre-rendered image pool: the same settings give the same weights.

Measured with the CLI on this machine (2 CPU cores shared with other jobs, torch on 2
threads; held out: 256 pretraining images at indices >= 1e6 and 256 ConceptWorld "val"
images; MAE per pixel and channel in [0, 255] units; agreement: the share of images
whose `score_caption` result (colours, shapes, relation) is unchanged by the round trip;
noisy: the same with N(0, 0.1^2) added to the normalised latents; originals: 99.8% (32
px) and 100% (64 px) match their own captions):

    setting (latent values)        train   MAE   agreement  pink    noisy
    32 px / 4x / 4 ch  (4x8x8)      94 s   2.38  88.1%      86.7%   83.4%   defaults
    64 px / 4x / 4 ch  (4x16x16)    96 s   1.79  97.9%      96.9%   96.1%   --resolution 64
    64 px / 8x / 8 ch  (8x8x8)      98 s   2.16  92.2%      91.8%   91.2%   the ae64x8 line above
    pixels, 32 px pooled 2x (3x16x16)  -   3.81  89.3%      89.8%   63.1%   today's demo latents
    pixels, 64 px pooled 4x (3x16x16)  -   4.40  97.9%      98.4%   63.3%

"train" is the training loop alone; rendering the pool and measuring add 10 s (32 px) to
30 s (64 px). At 32 px the autoencoder keeps what 2x pooling keeps in a third of the
values, with a lower MAE, and its decoder forgives noisy latents (the pixel latents are
not normalised: their std is ~0.75, so that noise is ~1.3 times as strong).

Every failure is a square read as a circle; colours and relations always survive, pink
included. 64 px images hold four times the pixels a shape, so the verifier reads them
more robustly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.autoencoder_report import reconstruction_grid, reconstruction_report, summary
from data.latents import ShapesAELatents, images_from_uint8
from data.shapes import ConceptWorld, ShapesWorld

CLASS_NAME = "ShapesAutoencoder"  # config.json's _class_name, as diffusers folders name theirs
WEIGHTS = "model.safetensors"
GRID = "reconstruction.png"
# Held-out images: pretraining samples from this index on (the shard demo uses the first
# thousands), and ConceptWorld's "val" split, which shares no image with "train".
HELD_OUT_START = 1_000_000


@dataclass(frozen=True)
class AEConfig:
    """Everything that decides the trained autoencoder; a folder is reused only for equal settings."""

    # ---- architecture
    resolution: int = 32  # training image side (the encoder is convolutional: any multiple of downsample works)
    downsample: int = 4  # spatial factor, a power of two: 32 px -> 8x8 latents
    channels: int = 4  # latent channels
    patch: int = 2  # pixel patches folded into channels first (a power of two dividing downsample)
    width: int = 48  # conv channels after the patch stem, doubled at each 2x downsampling ...
    max_width: int = 128  # ... up to this
    # ---- training
    steps: int = 4000
    batch_size: int = 32
    # Train on random crops of this side (a multiple of downsample; 0: whole images; None: 4
    # latent cells, 16 px at 4x). A conv net learns edges from crops as well as from whole
    # images, at a quarter of the cost: twice the steps in the same time beat whole images.
    crop: int | None = None
    lr: float = 2e-3  # Adam; cosine-decayed to lr / 20 over `steps` after a short warmup
    l1_weight: float = 0.5
    edge_weight: float = 10.0  # extra loss weight on pixels next to an edge (see _edge_weights)
    latent_noise: float = 0.1  # Gaussian noise, relative to the latents' per-channel std (see the docstring)
    num_images: int = 8192  # pre-rendered training images ...
    concept_share: float = 0.25  # ... this share from ConceptWorld (pink), the rest ShapesWorld
    world_seed: int = 0  # the worlds' seed
    seed: int = 0  # initialisation and batch order
    num_eval: int = 512  # held-out images for the reconstruction figures (half pink)

    def __post_init__(self):
        if self.crop is None:
            object.__setattr__(self, "crop", min(self.resolution, 4 * self.downsample))
        levels = int(round(math.log2(self.downsample))) if self.downsample >= 1 else -1
        rules = [
            ("downsample", self.downsample >= 1 and 2 ** levels == self.downsample, "a power of two >= 1"),
            ("resolution", self.resolution >= 32 and self.resolution % self.downsample == 0,
             f">= 32 (the shapes world's minimum) and a multiple of downsample={self.downsample}"),
            ("patch", self.patch >= 1 and self.downsample % self.patch == 0 and self.patch & (self.patch - 1) == 0,
             f"a power of two dividing downsample={self.downsample}"),
            ("channels", self.channels >= 1, ">= 1"),
            ("width", self.width >= 1, ">= 1"),
            ("max_width", self.max_width >= self.width, f">= width={self.width}"),
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 2, ">= 2 (the latent noise is scaled by a batch std)"),
            ("crop", self.crop == 0 or (self.crop % self.downsample == 0 and self.downsample <= self.crop
                                        <= self.resolution), f"0 or a multiple of downsample={self.downsample} "
                                                             f"up to resolution={self.resolution}"),
            ("lr", self.lr > 0, "> 0"),
            ("edge_weight", self.edge_weight >= 0, ">= 0"),
            ("l1_weight", self.l1_weight >= 0, ">= 0"),
            ("latent_noise", self.latent_noise >= 0, ">= 0"),
            ("num_images", self.num_images >= self.batch_size, f">= batch_size={self.batch_size}"),
            ("concept_share", 0.0 <= self.concept_share <= 1.0, "in [0, 1]"),
            ("num_eval", self.num_eval >= 2 and self.num_eval % 2 == 0, "an even number >= 2"),
        ]
        for key, ok, rule in rules:
            if not ok:
                raise ValueError(f"autoencoder {key} must be {rule}, got {getattr(self, key)!r}")

    @property
    def levels(self) -> int:
        """Stride-2 levels after the patch stem."""
        return int(round(math.log2(self.downsample // self.patch)))

    def level_width(self, level: int) -> int:
        return min(self.width * 2 ** level, self.max_width)

    def architecture(self) -> dict:
        """The fields that shape the network (what loading needs)."""
        return {k: getattr(self, k) for k in ("resolution", "downsample", "channels", "patch", "width", "max_width")}

    @classmethod
    def from_dict(cls, d: dict) -> "AEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown autoencoder settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ---- the network -----------------------------------------------------------------------------
class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(x))


class ShapesAutoencoder(nn.Module):
    """encode: (B, 3, H, W) in [-1, 1] -> raw latents (B, C, H/f, W/f); decode: back, unclamped."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        w, p, top = cfg.level_width, cfg.patch, cfg.levels
        # The stem folds p x p pixel patches into channels, so no conv runs at full resolution
        # (on a CPU those cost the most), and the head unfolds them again: edges stay sharp,
        # there is no upsampling of the last level to blur them.
        enc: list[nn.Module] = [nn.PixelUnshuffle(p), nn.Conv2d(3 * p * p, w(0), 3, padding=1), _Residual(w(0))]
        for level in range(1, top + 1):
            enc += [nn.SiLU(), nn.Conv2d(w(level - 1), w(level), 3, stride=2, padding=1), _Residual(w(level))]
        enc += [nn.SiLU(), nn.Conv2d(w(top), cfg.channels, 1)]
        dec: list[nn.Module] = [nn.Conv2d(cfg.channels, w(top), 3, padding=1)]
        for level in range(top, 0, -1):
            dec += [_Residual(w(level)), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(w(level), w(level - 1), 3, padding=1)]
        dec += [_Residual(w(0)), nn.SiLU(), nn.Conv2d(w(0), 3 * p * p, 3, padding=1), nn.PixelShuffle(p)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.encoder(images_BCHW)

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_BCHW)


# ---- images of the world ---------------------------------------------------------------------
def render(world: ShapesWorld, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """Samples start..start+n-1 of `world` as uint8 (n, H, W, 3) and their captions."""
    images, captions = zip(*(world.sample(i) for i in range(start, start + n))) if n else ((), ())
    size = world.image_size
    return torch.from_numpy(np.stack(images) if n else np.zeros((0, size, size, 3), np.uint8)), list(captions)


def training_images(cfg: AEConfig) -> torch.Tensor:
    """The fixed training pool, uint8 (N, H, W, 3): pretraining samples then pink ones."""
    num_pink = round(cfg.num_images * cfg.concept_share)
    shapes, _ = render(ShapesWorld(cfg.resolution, cfg.world_seed), 0, cfg.num_images - num_pink)
    pink, _ = render(ConceptWorld(cfg.resolution, cfg.world_seed, split="train"), 0, num_pink)
    return torch.cat([shapes, pink])


def held_out_images(cfg: AEConfig) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{"shapes": ..., "pink": ...}: (uint8 images, captions), none of them a training image."""
    n = cfg.num_eval // 2
    return {"shapes": render(ShapesWorld(cfg.resolution, cfg.world_seed), HELD_OUT_START, n),
            "pink": render(ConceptWorld(cfg.resolution, cfg.world_seed, split="val"), 0, n)}


# ---- training --------------------------------------------------------------------------------
def _lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _edge_weights(x_BCHW: torch.Tensor, weight: float) -> torch.Tensor:
    """1 + weight * (how much the 3x3 neighbourhood of each pixel varies, in [0, 1]), (B, 1, H, W).

    The verifier reads a shape from which pixels are near its colour: a few edge pixels
    read wrongly turn a small square into a circle. Flat regions are easy, so weighting
    edges puts the loss where the verifier looks."""
    span = F.max_pool2d(x_BCHW, 3, 1, 1) + F.max_pool2d(-x_BCHW, 3, 1, 1)  # local max - local min
    return 1 + weight * span.amax(dim=1, keepdim=True) / 2


def train(cfg: AEConfig, pool_NCHW: torch.Tensor, log_every: int = 100, progress=print,
          device: str | torch.device = "cpu") -> tuple[ShapesAutoencoder, dict]:
    """Train on `pool_NCHW` (images in [-1, 1]); returns (model in eval mode, {"seconds", "final_loss"}).
    Batches and noise are drawn on the CPU from `cfg.seed`, so a GPU run sees the same ones."""
    pool_NCHW = pool_NCHW.to(device)
    # A private RNG stream: training must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # channels_last: ~25% faster convolutions on a CPU (oneDNN's preferred layout).
        model = ShapesAutoencoder(cfg).to(device, memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
        model.train()
        t0, running, count = time.perf_counter(), 0.0, 0
        for step in range(1, cfg.steps + 1):
            x = pool_NCHW[torch.randint(len(pool_NCHW), (cfg.batch_size,), generator=gen).to(device)]
            if cfg.crop:  # one offset per batch, on the latent grid so strides line up as on whole images
                top, left = (cfg.downsample * int(o) for o in torch.randint(
                    (cfg.resolution - cfg.crop) // cfg.downsample + 1, (2,), generator=gen))
                x = x[:, :, top:top + cfg.crop, left:left + cfg.crop]
            x = x.contiguous(memory_format=torch.channels_last)
            z = model.encode(x)
            if cfg.latent_noise:
                std_1C11 = z.detach().std(dim=(0, 2, 3), keepdim=True)
                z = z + cfg.latent_noise * std_1C11 * torch.randn(z.shape, generator=gen).to(device)
            y = model.decode(z)
            err = y - x
            per_pixel = err.square() + cfg.l1_weight * err.abs()
            if cfg.edge_weight:
                per_pixel = per_pixel * _edge_weights(x, cfg.edge_weight)
            loss = per_pixel.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # A run that met one bad batch early once blew up to a constant image; clipping stops it.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running, count = running + loss.detach(), count + 1
            if progress and (step % log_every == 0 or step == cfg.steps):
                rate = step / (time.perf_counter() - t0)
                progress(f"step {step}/{cfg.steps} | loss {running.item() / count:.5f} | {rate:.1f} steps/s | "
                         f"eta {(cfg.steps - step) / rate:.0f}s")  # loss: mean since the last line
                running, count = 0.0, 0
    model.to("cpu", memory_format=torch.contiguous_format).eval().requires_grad_(False)
    return model, {"seconds": round(time.perf_counter() - t0, 1), "final_loss": round(loss.item(), 6)}


@torch.no_grad()
def latent_stats(model: ShapesAutoencoder, images_NCHW: torch.Tensor, batch: int = 256) -> tuple[list, list]:
    """Per-channel mean and std of the raw latents over `images_NCHW` (the training pool)."""
    z = torch.cat([model.encode(images_NCHW[s:s + batch]) for s in range(0, len(images_NCHW), batch)])
    return z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3)).tolist()


def read_config(path: str | os.PathLike) -> dict | None:
    """The config.json of a finished autoencoder folder at `path`, else None."""
    path = Path(path)
    try:
        with open(path / "config.json") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("_class_name") != CLASS_NAME or not (path / WEIGHTS).exists():
        return None
    return config


def is_trained(path: str | os.PathLike, cfg: AEConfig | None = None) -> bool:
    """Whether `path` holds a finished autoencoder (trained with `cfg`'s settings, if given)."""
    config = read_config(path)
    return config is not None and (cfg is None or config["settings"] == asdict(cfg))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ShapesAutoencoder, dict]:
    """(model in eval mode, config.json) of a finished folder; ValueError if it is not one."""
    from safetensors.torch import load_file

    config = read_config(path)
    if config is None:
        raise ValueError(f"{str(path)!r} holds no trained shapes autoencoder (config.json with _class_name "
                         f"{CLASS_NAME!r} and {WEIGHTS}); train one with `python -m data.autoencoder --out {path}`")
    model = ShapesAutoencoder(AEConfig.from_dict(config["settings"]))
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    return model.to(device).eval().requires_grad_(False), config


def fit(cfg: AEConfig, log_every: int = 100, progress=print) -> tuple[ShapesAELatents, dict, np.ndarray]:
    """Train, normalise and measure: (latents, the folder's config.json, reconstruction grid)."""
    t0 = time.perf_counter()
    pool_NCHW = images_from_uint8(training_images(cfg))
    render_s = time.perf_counter() - t0
    model, info = train(cfg, pool_NCHW, log_every, progress)
    info.update(render_seconds=round(render_s, 1), threads=torch.get_num_threads())
    mean, std = latent_stats(model, pool_NCHW)
    latents = ShapesAELatents(model, mean, std)
    held_out = held_out_images(cfg)
    config = {"_class_name": CLASS_NAME, "architecture": cfg.architecture(), "settings": asdict(cfg),
              "latents_mean": mean, "latents_std": std, "training": info,
              "reconstruction": reconstruction_report(latents, held_out)}
    return latents, config, reconstruction_grid(latents, held_out)


def write_folder(folder: str | os.PathLike, latents: ShapesAELatents, config: dict, grid: np.ndarray) -> None:
    """model.safetensors, reconstruction.png, then (last: it marks the folder finished) config.json."""
    from PIL import Image
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in latents.model.state_dict().items()}, str(folder / WEIGHTS))
    Image.fromarray(grid).save(folder / GRID)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)


def ensure_autoencoder(out: str | os.PathLike, cfg: AEConfig, log_every: int = 100, progress=print) -> dict:
    """Train and save an autoencoder at `out` unless one with these settings is there; returns config.json.

    Built in a private temp folder next to `out` and renamed into place, so `out` is
    either absent or complete; a concurrent builder that loses the rename race throws its
    copy away. A finished folder with other settings is refused rather than replaced.
    """
    out = Path(out)
    existing = read_config(out)
    if existing is not None:
        if existing["settings"] != asdict(cfg):
            diff = {k: (v, asdict(cfg)[k]) for k, v in existing["settings"].items() if asdict(cfg).get(k) != v}
            raise ValueError(f"{out} holds an autoencoder trained with other settings ({{setting: (there, asked)}}: "
                             f"{diff}); remove it or choose another folder")
        if progress:
            progress(f"{out}: already trained with these settings (cached): {summary(existing['reconstruction'])}")
        return existing
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a finished autoencoder folder; remove it or choose another")
    if progress:
        side = cfg.resolution // cfg.downsample
        progress(f"training the shapes autoencoder into {out}: {cfg.resolution} px -> {cfg.channels}x{side}x{side} "
                 f"latents, {cfg.steps} steps on {torch.get_num_threads()} threads")
    latents, config, grid = fit(cfg, log_every, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_folder(tmp, latents, config, grid)
        # mkdtemp's 0700 (and safetensors' 0600) would hide the folder from other users' workers.
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        if out.exists():
            out.rmdir()  # an empty folder (checked above): rename cannot replace it on every OS
        os.rename(tmp, out)
    except OSError:
        if not is_trained(out, cfg):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(f"{out}: trained in {config['training']['seconds']:.0f}s: {summary(config['reconstruction'])}")
    return read_config(out)


def _field_type(name: str):
    default = AEConfig.__dataclass_fields__[name].default
    return int if name == "crop" else type(default)


def settings_from_args(pairs: list[str], **defaults) -> AEConfig:
    """AEConfig from ["key=value", ...] (the pipeline's --ae), over `defaults`."""
    values = dict(defaults)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in AEConfig.__dataclass_fields__:
            raise ValueError(f"autoencoder setting {pair!r}: expected KEY=VALUE with KEY one of "
                             f"{[f.name for f in fields(AEConfig)]}")
        try:
            values[key] = _field_type(key)(value)
        except ValueError as e:
            raise ValueError(f"autoencoder setting {pair!r}: {e}") from None
    return AEConfig(**values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train the shapes-world autoencoder into a folder (a no-op if it "
                                            "already holds one with these settings). Settings: data/autoencoder.py "
                                            "AEConfig.")
    p.add_argument("--out", required=True, help="the autoencoder folder (written atomically)")
    for f in fields(AEConfig):  # one flag per setting, --resolution, --downsample, --channels, --steps, ...
        p.add_argument(f"--{f.name.replace('_', '-')}", type=_field_type(f.name), default=f.default,
                       help=f"default {f.default}")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=250)
    a = vars(p.parse_args(argv))
    out, threads, log_every = a.pop("out"), a.pop("threads"), a.pop("log_every")
    torch.set_num_threads(threads)
    config = ensure_autoencoder(out, AEConfig(**a), log_every)
    print(json.dumps({"out": out, "train_seconds": config["training"]["seconds"], **config["reconstruction"]}))
    return config


if __name__ == "__main__":
    main()
