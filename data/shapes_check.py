"""The shapes world's exact checker: what a generated image shows, and whether it matches its caption.

Nearest-palette pixel classification, the largest blob per colour, its shape (by fill
ratio and aspect) and the relation between two blobs' centroids: `describe`,
`score_caption`, `caption_matches`. Every later stage is measured with these
(trainer/evaluate.py, rl/rewards/rubric.py); the world itself is data/shapes.py.
"""

from __future__ import annotations

import numpy as np

from data.shapes import BACKGROUNDS, COLOURS, SHAPES, parse_caption

_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32)


def classify_pixels(image_HWC: np.ndarray, max_distance: float = 64.0) -> np.ndarray:
    """Index into the palette (COLOURS, pink included, then BACKGROUNDS) of each pixel's nearest
    colour, -1 if none is within max_distance (antialiased edges, muddy generated colours)."""
    if image_HWC.ndim != 3 or image_HWC.shape[-1] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {image_HWC.shape}")
    pixels = image_HWC.reshape(-1, 3).astype(np.float32)
    dist_NP = np.linalg.norm(pixels[:, None, :] - _PALETTE[None, :, :], axis=-1)
    label = dist_NP.argmin(axis=1)
    label[dist_NP.min(axis=1) > max_distance] = -1
    return label.reshape(image_HWC.shape[:2])


def largest_component(mask_HW: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask.

    Why: an antialiased edge blends a shape with the background, and some blends land
    near another palette colour (orange + light grey reads as yellow). Those stray
    pixels form thin rings away from the real shape; keeping the largest blob drops them.
    """
    height, width = mask_HW.shape
    big = height * width
    # Label propagation: every pixel takes the minimum label among its 4-neighbours
    # until nothing changes; each blob ends up labelled by its smallest flat index.
    label_HW = np.where(mask_HW, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(label_HW, 1, constant_values=big)
        up, down, left, right = padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]
        neighbours = np.minimum.reduce([up, down, left, right, label_HW])
        new = np.where(mask_HW, neighbours, big)
        if np.array_equal(new, label_HW):
            break
        label_HW = new
    ids, counts = np.unique(label_HW[mask_HW], return_counts=True)
    if len(ids) == 0:
        return mask_HW.copy()
    return label_HW == ids[counts.argmax()]


def colour_centroids(image_HWC: np.ndarray, max_distance: float = 64.0) -> dict[str, tuple[float, float, float]]:
    """{colour: (row, col, pixel_fraction)} for every shape colour present, measured on its
    largest connected blob; row/col in pixels."""
    label_HW = classify_pixels(image_HWC, max_distance)
    out = {}
    for i, name in enumerate(COLOURS):
        mask = label_HW == i
        if mask.any():
            rows, cols = np.nonzero(largest_component(mask))
            out[name] = (float(rows.mean()), float(cols.mean()), len(rows) / mask.size)
    return out


# The verifier's two thresholds (see _guess_shape).
TRIANGLE_UPPER, SQUARE_FILL = 0.4, 0.93


def shape_stats(mask_HW: np.ndarray) -> tuple[float, float]:
    """(fill, upper) of a blob: the share of its bounding box it covers, and the share of
    its pixels in the upper half of that box (a pixel on the middle row counts half)."""
    rows, cols = np.nonzero(mask_HW)
    fill = len(rows) / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    mid = (rows.max() + rows.min()) / 2
    upper = ((rows < mid).sum() + 0.5 * (rows == mid).sum()) / len(rows)
    return float(fill), float(upper)


def _guess_shape(mask_HW: np.ndarray) -> str:
    # How much of its bounding box a blob fills separates squares (~1) from the rest;
    # a triangle (apex up) keeps only ~1/4 of its pixels in the upper half of its box.
    fill, upper = shape_stats(mask_HW)
    if upper < TRIANGLE_UPPER:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def shape_margin(mask_HW: np.ndarray, shape: str) -> float:
    """How far a blob is inside the verifier's region for `shape`, in units of its
    statistics: positive iff `_guess_shape` reads it as `shape` (zero on a boundary)."""
    fill, upper = shape_stats(mask_HW)
    if shape == "triangle":
        return TRIANGLE_UPPER - upper
    if shape == "square":
        return min(upper - TRIANGLE_UPPER, fill - SQUARE_FILL)
    if shape == "circle":
        return min(upper - TRIANGLE_UPPER, SQUARE_FILL - fill)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def blobs(image_HWC: np.ndarray, min_fraction: float = 0.01, max_distance: float = 64.0) -> dict[str, np.ndarray]:
    """{colour: mask of its largest connected blob} for every palette colour whose blob
    covers at least min_fraction of the image (smaller ones are noise)."""
    label_HW = classify_pixels(image_HWC, max_distance)
    out = {}
    for i, name in enumerate(COLOURS):
        mask = largest_component(label_HW == i)
        if mask.mean() >= min_fraction:
            out[name] = mask
    return out


def describe(image_HWC: np.ndarray, min_fraction: float = 0.01,
             max_distance: float = 64.0) -> list[tuple[str, str, tuple[float, float], float]]:
    """The shapes seen in an image: [(colour, shape guess, (row, col) centroid, pixel_fraction)],
    largest first, each colour measured on its largest connected blob; blobs covering less
    than min_fraction of the image are ignored as noise."""
    found = []
    for name, mask in blobs(image_HWC, min_fraction, max_distance).items():
        rows, cols = np.nonzero(mask)
        found.append((name, _guess_shape(mask), (float(rows.mean()), float(cols.mean())), float(mask.mean())))
    return sorted(found, key=lambda f: -f[3])


def relation_holds(relation: str, first_rc: tuple[float, float], second_rc: tuple[float, float]) -> bool:
    (r1, c1), (r2, c2) = first_rc, second_rc
    return {"above": r1 < r2, "below": r1 > r2, "left of": c1 < c2, "right of": c1 > c2}[relation]


def score_caption(image_HWC: np.ndarray, caption: str, min_fraction: float = 0.01) -> dict[str, bool]:
    """Does the image show the caption? Three checks (the demo reports each as an accuracy):
    colours: exactly the captioned colours are present; shapes: each has the captioned shape;
    relation: centroids satisfy the relation (True for one-shape captions)."""
    scene = parse_caption(caption)
    seen = {colour: (shape, rc) for colour, shape, rc, _ in describe(image_HWC, min_fraction)}
    colours_ok = set(seen) == {c for c, _ in scene.objects}
    shapes_ok = colours_ok and all(seen[c][0] == s for c, s in scene.objects)
    relation_ok = scene.relation is None or (colours_ok and relation_holds(
        scene.relation, seen[scene.objects[0][0]][1], seen[scene.objects[1][0]][1]))
    return {"colours": colours_ok, "shapes": shapes_ok, "relation": relation_ok}


def caption_matches(image_HWC: np.ndarray, caption: str, check_shapes: bool = True) -> bool:
    score = score_caption(image_HWC, caption)
    return score["colours"] and score["relation"] and (score["shapes"] or not check_shapes)
