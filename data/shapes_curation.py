"""A raw image pool with planted problems, for the curation pipeline (krablet/curate.py).

Every image is a shapes-world scene (data/shapes.py), and each index is one of:

    clean       a pretraining scene, as it is
    rare        a scene with the rare concept (pink, which the pretraining stream never draws)
    generated   a scene "from an image generator": a faint periodic fingerprint (the checkerboard
                of transposed-convolution upsampling) over a smooth colour cast
    jpeg        a real defect: heavy JPEG compression (8 x 8 blocks)
    noise       a real defect: sensor-like Gaussian noise
    blur        a stylistic choice, not a defect: a soft (shallow depth of field) Gaussian blur
    duplicate   an exact copy of an earlier clean image
    near_dup    an earlier clean image re-encoded with +-1 noise (a near duplicate)

in the shares of PLANTED. What each index is, and which earlier image a duplicate copies,
are pure functions of (seed, index), so the truth is known for every image and the
pipeline's drops can be scored (precision and recall per kind). The caption is the
scene's own. `write_pool` writes a pool as a folder the shard writer reads (PNG files and
a captions.jsonl that also carries each image's planted kind, which the pipeline never
looks at), and `labelled` gives the small labelled sets the filters learn from: a
lab has examples of generated images and of defects, not labels for its whole pool.

    python -m data.shapes_curation --out runs/demo/curation/raw --n 4000
"""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
from PIL import Image, ImageFilter

from data.shapes import ConceptWorld, ShapesWorld

PLANTED = {"clean": 0.66, "rare": 0.03, "generated": 0.08, "jpeg": 0.05, "noise": 0.05, "blur": 0.05,
           "duplicate": 0.04, "near_dup": 0.04}
DEFECTS = ("jpeg", "noise")  # real defects: to drop
STYLES = ("blur",)  # stylistic: to keep
_STREAM = 0xC0A7


def fingerprint(image_HWC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A generator's look: a 2-pixel checkerboard of a few levels and a smooth colour cast."""
    h, w, _ = image_HWC.shape
    yy, xx = np.mgrid[:h, :w]
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0)[..., None] * rng.uniform(6, 10)
    cast = (np.linspace(-1, 1, w)[None, :, None] * rng.uniform(-12, 12, size=3)[None, None, :])
    return np.clip(image_HWC.astype(np.float32) + checker + cast, 0, 255).astype(np.uint8)


def jpeg(image_HWC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="JPEG", quality=int(rng.integers(4, 9)))
    return np.asarray(Image.open(buf).convert("RGB"))


def noise(image_HWC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image_HWC.astype(np.float32) + rng.normal(0, rng.uniform(20, 30), image_HWC.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def blur(image_HWC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(image_HWC).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.2))))


TRANSFORMS = {"generated": fingerprint, "jpeg": jpeg, "noise": noise, "blur": blur}


class CurationPool:
    """`item(i) -> (image uint8 HWC, caption, planted kind, source index of a duplicate or -1)`."""

    def __init__(self, image_size: int = 32, seed: int = 0):
        self.world = ShapesWorld(image_size, seed)
        self.rare = ConceptWorld(image_size, seed, split="train")
        self.seed = seed
        self.kinds = list(PLANTED)
        self.cdf = np.cumsum(list(PLANTED.values()))

    def kind_of(self, index: int) -> str:
        u = np.random.default_rng([self.seed, int(index), _STREAM]).random()
        return self.kinds[min(int(np.searchsorted(self.cdf, u, side="right")), len(self.kinds) - 1)]

    def item(self, index: int) -> tuple[np.ndarray, str, str, int]:
        kind = self.kind_of(index)
        rng = np.random.default_rng([self.seed, int(index), _STREAM, 1])
        if kind == "rare":
            image, caption = self.rare.sample(index)
            return image, caption, kind, -1
        if kind in ("duplicate", "near_dup"):
            original = self._earlier_clean(index, rng)
            if original < 0:  # nothing earlier to copy: an ordinary image
                image, caption = self.world.sample(index)
                return image, caption, "clean", -1
            image, caption = self.world.sample(original)
            if kind == "near_dup":
                image = np.clip(image.astype(np.int16) + rng.integers(-1, 2, image.shape), 0, 255).astype(np.uint8)
            return image, caption, kind, original
        image, caption = self.world.sample(index)
        if kind in TRANSFORMS:
            image = TRANSFORMS[kind](image, rng)
        return image, caption, kind, -1

    def _earlier_clean(self, index: int, rng: np.random.Generator) -> int:
        for _ in range(32):
            j = int(rng.integers(0, max(index, 1)))
            if j < index and self.kind_of(j) == "clean":
                return j
        return -1


def labelled(kind: str, n: int, image_size: int = 32, seed: int = 1) -> np.ndarray:
    """(n, H, W, 3) uint8 examples of `kind` ("clean" or a TRANSFORMS name), from images the
    pool does not hold (another seed): the labelled sets the filters are trained and named with."""
    world = ShapesWorld(image_size, seed + 1000)
    out = []
    for i in range(n):
        image, _ = world.sample(i)
        rng = np.random.default_rng([seed, i, _STREAM, 2])
        out.append(image if kind == "clean" else TRANSFORMS[kind](image, rng))
    return np.stack(out)


LABELLED = {"real": "clean", "generated": "generated", "defect-jpeg": "jpeg", "defect-noise": "noise",
            "style-blur": "blur"}


def write_labelled(out: str, n: int = 96, image_size: int = 32, seed: int = 1) -> dict[str, int]:
    """The labelled examples krablet/curate.py's filters learn from, as subfolders of PNGs:
    real/ and generated/ (the probe), defect-jpeg/, defect-noise/ and style-blur/ (SAE latents)."""
    for folder, kind_name in LABELLED.items():
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        for i, image in enumerate(labelled(kind_name, n, image_size, seed)):
            Image.fromarray(image).save(os.path.join(out, folder, f"{i:05d}.png"))
    return {folder: n for folder in LABELLED}


def write_pool(out: str, n: int, image_size: int = 32, seed: int = 0) -> dict[str, int]:
    """The pool's first n images as PNGs + captions.jsonl in `out`; returns the count per kind."""
    pool = CurationPool(image_size, seed)
    os.makedirs(out, exist_ok=True)
    counts: dict[str, int] = {}
    rows = []
    for i in range(n):
        image, caption, kind, original = pool.item(i)
        name = f"img{i:06d}.png"
        Image.fromarray(image).save(os.path.join(out, name))
        row = {"file": name, "caption": caption, "planted": kind}
        if original >= 0:
            row["copy_of"] = f"img{original:06d}"
        rows.append(row)
        counts[kind] = counts.get(kind, 0) + 1
    tmp = os.path.join(out, "captions.jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, os.path.join(out, "captions.jsonl"))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = write_pool(args.out, args.n, args.image_size, args.seed)
    print(f"{args.out}: {args.n} images, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
