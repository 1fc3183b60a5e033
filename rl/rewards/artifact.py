"""Artifact reward: the probability that an image is clean, from a linear head on image embeddings.

    python -m rl.rewards.artifact --out /tmp/artifact32          # shapes world, 32 px, the tiny random tower
    python -m rl.rewards.artifact --out DIR --model ViT-B-32 --pretrained laion2b_s34b_b79k --image-size 64

GRPO optimises whatever the reward pays for, and a reward that reads content (a rubric, a
VLM) pays as well for an image covered in a faint grid or pushed to full saturation, the
patterns RL fine-tuning of diffusion models is known to drift into. This reward scores
P(clean) by logistic regression on frozen open_clip image embeddings (rl.rewards.embed),
trained on the world's own images (clean) against copies with one corruption each:

    jpeg        JPEG block artifacts: PIL JPEG at quality 5-20 (8x8 blocks, 4:2:0 chroma)
    noise       additive Gaussian noise, sigma 8-24 of 255
    grid        a periodic overlay: one-pixel lines every 2-8 px or a checkerboard of 2-8 px cells
    saturation  colours pushed away from grey by a factor 2-3.5 (PIL's ImageEnhance.Color)

`train_artifact_head` embeds the images once, fits the head on a seeded split (full-batch
Adam, zero init: the same settings give the same head) and measures held-out accuracy per
kind; the folder it saves is what `build(world, path=DIR)` loads:

    config.json         the tower (model, pretrained, init_seed, its open_clip config,
                        embedding settings), the training settings and seed, and
                        "heldout_accuracy": {"clean": P(clean) > 1/2 on held-out clean
                        images, kind: accuracy on held-out clean images and their copies
                        with that corruption, half each}
    head.safetensors    mean, std (D,): the standardisation of the training embeddings;
                        weight (D,), bias (1,): the logistic regression on them

Measured with the tiny random tower (rl.rewards.embed "k2-tiny-resnet"; shapes world,
32 px, the CLI's defaults: 512 images, 128 of them held out, seed 0), 13 s for the whole
CLI on 2 CPU cores: held-out accuracy clean 0.992, jpeg 0.965, noise 0.996, grid 0.988,
saturation 0.965. A pretrained tower is the real use; the random one is a stand-in that
the tests and the demo can build without weights.

details: {"artifact": the scores}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rl.rewards import Reward, RewardOutput, check_inputs
from rl.rewards.embed import DEFAULT_MODEL, ImageEmbedder

HEAD_KEYS = ("mean", "std", "weight", "bias")


# ---- corruptions ----------------------------------------------------------------------------
def jpeg_blocks(image_HWC: np.ndarray, rng: np.random.Generator, quality: int | None = None) -> np.ndarray:
    """The image through PIL's JPEG at `quality` (default: drawn from 5-20): 8x8 block edges,
    ringing at shape borders, 4:2:0 chroma bleeding."""
    quality = int(rng.integers(5, 21)) if quality is None else quality
    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB")).copy()


def gaussian_noise(image_HWC: np.ndarray, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
    """Independent N(0, sigma^2) per pixel and channel, in [0, 255] units (default sigma:
    drawn from 8-24), rounded and clipped."""
    sigma = rng.uniform(8.0, 24.0) if sigma is None else sigma
    noisy = image_HWC.astype(np.float64) + rng.normal(0.0, sigma, image_HWC.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def grid_pattern(image_HWC: np.ndarray, rng: np.random.Generator, period: int | None = None,
                 amplitude: float | None = None, style: str | None = None) -> np.ndarray:
    """A periodic overlay, the texture GRPO-tuned diffusion models drift into when a reward
    pays for it: `style` "lines" (one-pixel horizontal and vertical lines every `period` px)
    or "checker" (a checkerboard of period-px cells), at a random phase, brightening or
    darkening by `amplitude` levels (defaults: either style, period 2-8, amplitude 24-56)."""
    period = int(rng.integers(2, 9)) if period is None else period
    amplitude = rng.uniform(24.0, 56.0) if amplitude is None else amplitude
    style = ("lines", "checker")[int(rng.integers(2))] if style is None else style
    if style not in ("lines", "checker"):
        raise ValueError(f"grid style must be 'lines' or 'checker', got {style!r}")
    h, w = image_HWC.shape[:2]
    ys, xs = np.ogrid[:h, :w]
    dy, dx = rng.integers(0, period, size=2)
    if style == "lines":
        mask = ((ys + dy) % period == 0) | ((xs + dx) % period == 0)
    else:
        mask = ((ys + dy) // period + (xs + dx) // period) % 2 == 1
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = image_HWC.astype(np.float64) + sign * amplitude * mask[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def over_saturation(image_HWC: np.ndarray, rng: np.random.Generator, factor: float | None = None) -> np.ndarray:
    """Colours pushed away from their grey by `factor` (default: drawn from 2-3.5), PIL's
    ImageEnhance.Color, clipped: the burnt, hyper-saturated look of reward-hacked samples."""
    factor = rng.uniform(2.0, 3.5) if factor is None else factor
    return np.asarray(ImageEnhance.Color(Image.fromarray(image_HWC)).enhance(factor)).copy()


CORRUPTIONS: dict[str, Callable[..., np.ndarray]] = {
    "jpeg": jpeg_blocks, "noise": gaussian_noise, "grid": grid_pattern, "saturation": over_saturation,
}
KINDS = tuple(CORRUPTIONS)


def corrupt(image_HWC: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`image_HWC` (RGB uint8) with the corruption `kind` (one of KINDS), its strength drawn from `rng`."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}: kinds are {list(KINDS)}")
    if not isinstance(image_HWC, np.ndarray) or image_HWC.dtype != np.uint8 or image_HWC.ndim != 3 \
            or image_HWC.shape[-1] != 3:
        raise ValueError(f"corruptions take one RGB uint8 image (H, W, 3), got "
                         f"{getattr(image_HWC, 'dtype', type(image_HWC).__name__)} {getattr(image_HWC, 'shape', '')}")
    return CORRUPTIONS[kind](np.ascontiguousarray(image_HWC), rng)


def _writable(folder: str | os.PathLike) -> Path:
    """`folder` as a Path; ValueError if it exists and is not an empty folder."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; remove it or choose another")
    return out


# ---- the reward -------------------------------------------------------------------------------
class ArtifactReward(Reward):
    """P(clean) = sigmoid(w . (e - mean) / std + b) of the tower's embedding e of each image
    (see the module docstring). `info` is the training record saved beside the head."""

    name = "artifact"

    def __init__(self, embedder: ImageEmbedder, head: dict[str, torch.Tensor], info: dict | None = None):
        dim = embedder.settings["embed_dim"]
        shapes = {key: tuple(head[key].shape) if key in head else None for key in HEAD_KEYS}
        if shapes != {"mean": (dim,), "std": (dim,), "weight": (dim,), "bias": (1,)}:
            raise ValueError(f"an artifact head for {dim}-d embeddings holds mean, std, weight ({dim},) and "
                             f"bias (1,), got {shapes}")
        self.embedder = embedder
        self.head = {key: head[key].detach().float().cpu().contiguous() for key in HEAD_KEYS}
        self.info = dict(info or {})

    def clean_probability(self, embeddings_BD: torch.Tensor) -> torch.Tensor:
        """P(clean) of each embedding: float32 (B,)."""
        h = self.head
        return torch.sigmoid(((embeddings_BD.float() - h["mean"]) / h["std"]) @ h["weight"] + h["bias"])

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_inputs(images_BHWC, prompts)
        scores = self.clean_probability(self.embedder(images_BHWC))
        return RewardOutput(scores, {"artifact": scores.clone()})

    def config(self) -> dict:
        return {"embedder": self.embedder.settings, **self.info}

    def save(self, folder: str | os.PathLike) -> Path:
        """Writes config.json and head.safetensors into `folder`, atomically: into a temporary
        folder beside it, renamed once complete. ValueError if `folder` exists and is not empty."""
        out = _writable(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            (tmp / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
            save_file(self.head, str(tmp / "head.safetensors"))
            # mkdtemp's 0700 (and safetensors' 0600) would hide the folder from other users' workers.
            os.chmod(tmp, 0o755)
            for file in tmp.iterdir():
                os.chmod(file, 0o644)
            if out.exists():
                out.rmdir()  # empty (checked above): rename cannot replace a folder on every OS
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
             batch_size: int = 64) -> "ArtifactReward":
        """The head saved in `folder` and its tower; ValueError naming the folder if either is
        missing or damaged."""
        folder = Path(folder)
        retrain = f"train one with `python -m rl.rewards.artifact --out {folder}`"
        if not folder.is_dir():
            raise ValueError(f"artifact head folder {folder} does not exist; {retrain}")
        try:
            config = json.loads((folder / "config.json").read_text())
            tower = config["embedder"]
            embedder = ImageEmbedder.load(tower["model"], tower["pretrained"], device=device,
                                          init_seed=tower["init_seed"], model_config=tower["model_config"],
                                          batch_size=batch_size)
            if embedder.settings != tower:
                raise ValueError(f"the tower built from it has settings {embedder.settings}, saved: {tower}")
            head = load_file(str(folder / "head.safetensors"))
            info = {key: value for key, value in config.items() if key != "embedder"}
            return cls(embedder, head, info)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise ValueError(f"artifact head folder {folder} is missing a file or damaged "
                             f"({type(e).__name__}: {e}); {retrain}") from e


# ---- training ---------------------------------------------------------------------------------
def fit_logistic(x_ND: torch.Tensor, y_N: torch.Tensor, weight_N: torch.Tensor, steps: int = 300,
                 lr: float = 0.05, weight_decay: float = 1e-3,
                 progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Weighted logistic regression of y (1: clean) on the standardised embeddings: full-batch
    Adam from zero, loss sum_i weight_i BCE_i + weight_decay / 2 |w|^2. Returns the head.

    Zero init and full batches leave nothing random: the same embeddings give the same head."""
    mean = x_ND.mean(0)
    std = x_ND.std(0).clamp_min(1e-6)
    z = (x_ND - mean) / std
    w = torch.zeros(x_ND.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(z @ w + b, y_N, reduction="none")
        loss = (weight_N * bce).sum() + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        opt.step()
        if progress and (step + 1) % 100 == 0:
            progress(f"  step {step + 1}/{steps} | loss {loss.item():.4f}")
    return {"mean": mean, "std": std, "weight": w.detach(), "bias": b.detach()}


def corrupted_copies(images_NHWC: np.ndarray, indices: Sequence[int], kinds: Sequence[str],
                     seed: int) -> dict[str, np.ndarray]:
    """{kind: each image corrupted by kind}, image i's copy drawn from
    np.random.default_rng([seed, indices[i], position of kind in KINDS])."""
    return {kind: np.stack([corrupt(image, kind, np.random.default_rng([seed, int(i), KINDS.index(kind)]))
                            for image, i in zip(images_NHWC, indices)]) for kind in kinds}


def train_artifact_head(world, embedder: ImageEmbedder, num_images: int = 512, heldout_fraction: float = 0.25,
                        kinds: Sequence[str] = KINDS, steps: int = 300, lr: float = 0.05,
                        weight_decay: float = 1e-3, seed: int = 0, out: str | os.PathLike | None = None,
                        progress: Callable[[str], None] | None = None) -> ArtifactReward:
    """An artifact head for `embedder` trained on `world.sample(0 .. num_images - 1)` (clean)
    against a copy of each per corruption kind; `heldout_fraction` of the images (and their
    copies) are held out, drawn with `seed`, and scored for the report. Saved into `out`
    if given (see ArtifactReward.save).

    Clean and corrupted examples weigh half the loss each, so the head is not pushed toward
    "corrupted" by there being len(kinds) corrupted copies per clean image.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
    num_heldout = int(round(num_images * heldout_fraction))
    if num_heldout < 1 or num_images - num_heldout < 1:
        raise ValueError(f"need held-out and training images: {num_images} images with heldout_fraction "
                         f"{heldout_fraction} gives {num_heldout} held out")
    if out is not None:
        _writable(out)  # before the work, not after it
    kinds = [k for k in KINDS if k in kinds]
    say = progress or (lambda message: None)
    start = time.time()
    images = np.stack([world.sample(i)[0] for i in range(num_images)])
    copies = corrupted_copies(images, range(num_images), kinds, seed)
    say(f"embedding {num_images} images and {len(kinds)} corrupted copies of each ({', '.join(kinds)}) with "
        f"{embedder.settings['model']} (pretrained: {embedder.settings['pretrained']})")
    embedded = {}
    for name, batch in [("clean", images), *copies.items()]:
        began = time.time()
        embedded[name] = embedder(batch)
        say(f"  {name}: {len(batch)} images in {time.time() - began:.1f}s")
    clean_e, copy_e = embedded.pop("clean"), embedded

    order = np.random.default_rng(seed).permutation(num_images)
    held, train = torch.from_numpy(np.sort(order[:num_heldout])), torch.from_numpy(np.sort(order[num_heldout:]))
    x = torch.cat([clean_e[train]] + [copy_e[k][train] for k in kinds])
    n = len(train)
    y = torch.cat([torch.ones(n), torch.zeros(n * len(kinds))])
    weight = torch.cat([torch.full((n,), 0.5 / n), torch.full((n * len(kinds),), 0.5 / (n * len(kinds)))])
    say(f"fitting the head on {len(x)} embeddings ({n} clean), {steps} Adam steps")
    head = fit_logistic(x, y, weight, steps=steps, lr=lr, weight_decay=weight_decay, progress=progress)

    info = {"world": {"class": type(world).__name__, "image_size": world.image_size,
                      "seed": getattr(world, "seed", None)},
            "training": {"num_images": num_images, "heldout_fraction": heldout_fraction, "kinds": kinds,
                         "steps": steps, "lr": lr, "weight_decay": weight_decay},
            "seed": seed}
    reward = ArtifactReward(embedder, head, info)
    clean_ok = (reward.clean_probability(clean_e[held]) > 0.5).double()
    accuracy = {"clean": clean_ok.mean().item()}
    for kind in kinds:
        caught = (reward.clean_probability(copy_e[kind][held]) <= 0.5).double()
        accuracy[kind] = torch.cat([clean_ok, caught]).mean().item()
    reward.info["heldout_accuracy"] = accuracy
    reward.info["training"]["seconds"] = round(time.time() - start, 1)
    say(f"held-out accuracy ({num_heldout} images): " + " | ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    if out is not None:
        reward.save(out)
        say(f"saved {out} in {time.time() - start:.0f}s")
    return reward


def build(world=None, path: str | os.PathLike | None = None, **options) -> ArtifactReward:
    """The registry's entry (rl.rewards.build_reward): options {"path": head folder, "device", "batch_size"}."""
    if path is None:
        raise ValueError("the artifact reward needs options {'artifact': {'path': <head folder>}}; train one with "
                         "`python -m rl.rewards.artifact --out DIR`")
    return ArtifactReward.load(path, **options)


def main(argv: list[str] | None = None) -> dict:
    from data.shapes import ShapesWorld

    p = argparse.ArgumentParser(description="Train an artifact head on shapes-world images into a folder")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (default: the tiny random tower)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path (default: none)")
    p.add_argument("--images", type=int, default=512, help="clean world images, a quarter of them held out")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    embedder = ImageEmbedder.load(args.model, args.pretrained, device=args.device)
    reward = train_artifact_head(ShapesWorld(image_size=args.image_size), embedder, num_images=args.images,
                                 steps=args.steps, seed=args.seed, out=args.out,
                                 progress=lambda message: print(message, flush=True))
    return reward.config()


if __name__ == "__main__":
    main()
