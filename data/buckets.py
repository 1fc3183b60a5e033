"""Aspect-ratio buckets: a few (H, W) training sizes of about the same area.

Training at one square size would crop every portrait and landscape image to its
middle square. Instead each image goes to the bucket whose aspect ratio is closest
to its own (in log space, so 1:2 and 2:1 are equally far from 1:1), is resized to
cover that bucket and centre-cropped to it. Every bucket holds about
`resolution²` pixels, so a batch costs about the same whichever bucket it is from,
and batches are drawn from one bucket at a time so their tensors stack.

Sides are multiples of `multiple`: the VAE factor times the patch size at least
(8 x 2 = 16 for Qwen-Image latents); 64 is the usual choice at 256 px and above.
"""

from __future__ import annotations

import math

from PIL import Image


def bucket_key(size: tuple[int, int]) -> str:
    """"HxW", the name a bucket has in index.json."""
    return f"{size[0]}x{size[1]}"


class Buckets:
    """`sizes`: (H, W) pixel sizes sorted from tallest to widest; `assign(h, w) -> bucket id`."""

    def __init__(self, resolution: int, multiple: int = 64, max_ratio: float = 2.0):
        if multiple < 1 or resolution < multiple or resolution % multiple:
            raise ValueError(f"bucket resolution {resolution} must be a positive multiple of "
                             f"the side multiple {multiple}")
        if max_ratio < 1.0:
            raise ValueError(f"bucket max_ratio must be >= 1 (long side / short side), got {max_ratio}")
        self.resolution, self.multiple, self.max_ratio = resolution, multiple, max_ratio
        area = resolution * resolution
        sizes = set()
        # For every short side, the long side that keeps the area closest to resolution²
        # without passing max_ratio; sizes more than 10% off the area are dropped (they
        # would make that bucket's steps cheaper or dearer than the rest). Both
        # orientations, so the set is symmetric under transposition.
        for short in range(multiple, resolution + 1, multiple):
            long = min(round(area / short / multiple), math.floor(max_ratio * short / multiple + 1e-9)) * multiple
            if long >= short and abs(short * long / area - 1) <= 0.1:
                sizes.update({(short, long), (long, short)})
        self.sizes: list[tuple[int, int]] = sorted(sizes, key=lambda s: s[1] / s[0])
        self._log_ratios = [math.log(w / h) for h, w in self.sizes]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, bucket: int) -> tuple[int, int]:
        return self.sizes[bucket]

    def keys(self) -> list[str]:
        return [bucket_key(s) for s in self.sizes]

    def assign(self, height: int, width: int) -> int:
        """Id of the bucket whose log aspect ratio is closest to the image's (ties: the taller bucket)."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        target = math.log(width / height)
        return min(range(len(self.sizes)), key=lambda i: (abs(self._log_ratios[i] - target), i))

    def resize_crop(self, image: Image.Image, bucket: int) -> Image.Image:
        """Scale `image` to cover the bucket (keeping its aspect), then centre-crop to it."""
        bh, bw = self.sizes[bucket]
        w, h = image.size
        scale = max(bh / h, bw / w)
        # ceil so rounding never leaves the scaled image a pixel short of the bucket.
        nh, nw = max(bh, math.ceil(h * scale - 1e-6)), max(bw, math.ceil(w * scale - 1e-6))
        if (nh, nw) != (h, w):
            # A box prefilter when shrinking (antialiasing); bicubic for upscaling.
            image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
        top, left = (nh - bh) // 2, (nw - bw) // 2
        return image.crop((left, top, left + bw, top + bh))
