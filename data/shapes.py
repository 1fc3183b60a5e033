"""The demo "shapes" world: procedural captioned images small enough to train on a laptop.

Each image is a plain light or dark background with one or two flat shapes
(circle, square, triangle) in six well-separated colours. Captions state what is
drawn and, for two shapes, how they sit relative to each other:

    "a red circle"
    "a red circle above a blue square"
    "an orange triangle to the left of a green circle"

The layout always follows the caption (the first shape sits wholly in the half
the relation names), so a checker that only finds colour centroids can score a
generated image against its prompt: `describe`, `score_caption`, `caption_matches`.

Compositional hold-out: two-shape captions that contain one of `HELD_OUT_PAIRS`
(e.g. a purple triangle next to anything) never appear in the training stream,
although each held-out pair is still trained on alone ("a purple triangle").
`held_out_prompts()` are eight such compositions, used to see whether a model
composes what it learned separately.

Everything is a pure function of (seed, index): `np.random.default_rng([seed, index])`,
never a global RNG, so any process can render any sample id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Chosen far apart in RGB (every pair > 90 apart) so nearest-palette
# classification stays unambiguous even on blurry generated samples.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 165, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (255, 140, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light": (235, 235, 228),
    "dark": (30, 30, 36),
}
SHAPES = ("circle", "square", "triangle")
# Canonical relation name -> the words used in captions.
RELATIONS: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below",),
    "left of": ("to", "the", "left", "of"),
    "right of": ("to", "the", "right", "of"),
}
# (colour, shape) pairs that never appear in *two-shape* training captions.
HELD_OUT_PAIRS = (("purple", "triangle"), ("orange", "circle"))

_HELD_OUT_PROMPTS = (
    "a purple triangle above a green circle",
    "a blue square below a purple triangle",
    "a purple triangle to the left of a yellow square",
    "a red circle to the right of a purple triangle",
    "an orange circle above a blue triangle",
    "a green square below an orange circle",
    "an orange circle to the left of a purple triangle",
    "a yellow triangle to the right of an orange circle",
)
_TRAIN_PROMPTS = (
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a green circle above a red square",
    "a blue triangle below a yellow circle",
    "a purple square to the left of an orange triangle",
    "a red triangle to the right of a green square",
    "an orange square above a purple circle",
)

SINGLE_FRACTION = 0.25  # share of one-shape images in the training stream
SUPERSAMPLE = 4  # antialiasing: rasterise at 4x and box-filter down


@dataclass(frozen=True)
class Scene:
    """A parsed caption: one or two (colour, shape) objects and, for two, their relation."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None  # a key of RELATIONS: the first object relative to the second


def _article(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def scene_to_caption(scene: Scene) -> str:
    words = []
    for i, (colour, shape) in enumerate(scene.objects):
        if i == 1:
            words.extend(RELATIONS[scene.relation])
        words.extend([_article(colour), colour, shape])
    return " ".join(words)


def parse_caption(caption: str) -> Scene:
    """Inverse of `scene_to_caption`; ValueError for anything this world cannot draw."""
    words = caption.split()

    def parse_object(ws: list[str]) -> tuple[str, str]:
        if len(ws) != 3 or ws[1] not in COLOURS or ws[2] not in SHAPES or ws[0] != _article(ws[1]):
            raise ValueError(f"cannot parse {' '.join(ws)!r} in caption {caption!r}: expected "
                             f"'a|an <colour> <shape>' with colour in {list(COLOURS)} and shape in {list(SHAPES)}")
        return ws[1], ws[2]

    if len(words) == 3:
        return Scene((parse_object(words),))
    for relation, rel_words in RELATIONS.items():
        n = len(rel_words)
        if len(words) == 6 + n and tuple(words[3:3 + n]) == rel_words:
            first, second = parse_object(words[:3]), parse_object(words[3 + n:])
            if first[0] == second[0]:
                raise ValueError(f"caption {caption!r}: the two shapes must have different colours")
            return Scene((first, second), relation)
    raise ValueError(f"cannot parse caption {caption!r}: expected one shape, or two joined by one of "
                     f"{[' '.join(w) for w in RELATIONS.values()]}")


def is_held_out(scene: Scene) -> bool:
    return len(scene.objects) == 2 and any(obj in HELD_OUT_PAIRS for obj in scene.objects)


def _shape_mask(shape: str, cy: float, cx: float, r: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` centred at (cy, cx) with "radius" r, sampled at pixel coordinates ys, xs."""
    dy, dx = ys - cy, xs - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        half = 0.85 * r  # a touch smaller than the circle so both look the same size
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":
        # Upright isosceles: apex at cy - r, base at cy + 0.75 r, base half-width r.
        top, height = -r, 1.75 * r
        frac = (dy - top) / height  # 0 at the apex, 1 at the base
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


class ShapesWorld:
    """Deterministic captioned images: `sample(index) -> (image_HWC uint8, caption)`."""

    def __init__(self, image_size: int = 32, seed: int = 0):
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 for two shapes to fit legibly, got {image_size}")
        self.image_size = image_size
        self.seed = seed

    # ---- captions -------------------------------------------------------------------------
    def all_captions(self) -> list[str]:
        """Every caption this world can draw (training and held out), in a fixed order."""
        objects = [(c, s) for c in COLOURS for s in SHAPES]
        scenes = [Scene((o,)) for o in objects]
        for a, b in itertools.product(objects, objects):
            if a[0] != b[0]:
                scenes.extend(Scene((a, b), rel) for rel in RELATIONS)
        return [scene_to_caption(s) for s in scenes]

    def training_captions(self) -> list[str]:
        return [c for c in self.all_captions() if not is_held_out(parse_caption(c))]

    def held_out_prompts(self) -> list[str]:
        """Eight fixed two-shape prompts that the training stream never produces."""
        return list(_HELD_OUT_PROMPTS)

    def train_prompts_example(self) -> list[str]:
        """Eight fixed prompts from the training distribution (for sample grids)."""
        return list(_TRAIN_PROMPTS)

    def vocabulary(self) -> list[str]:
        """All words any caption uses, sorted."""
        return sorted({w for c in self.all_captions() for w in c.split()})

    def _draw_scene(self, rng: np.random.Generator) -> Scene:
        colours = list(COLOURS)
        if rng.random() < SINGLE_FRACTION:
            return Scene(((colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]),))
        while True:  # rejection keeps the draw a pure function of the rng state
            c1, c2 = rng.choice(len(colours), size=2, replace=False)
            s1, s2 = rng.integers(len(SHAPES), size=2)
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
            scene = Scene(((colours[c1], SHAPES[s1]), (colours[c2], SHAPES[s2])), relation)
            if not is_held_out(scene):
                return scene

    # ---- images ---------------------------------------------------------------------------
    def sample(self, index: int) -> tuple[np.ndarray, str]:
        """Training sample `index` (>= 0): (image_HWC uint8, caption); never a held-out caption."""
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        caption = scene_to_caption(self._draw_scene(rng))
        return self.render(caption, rng), caption

    def render(self, caption: str, rng: np.random.Generator) -> np.ndarray:
        """Draw `caption` (any parseable caption, held out or not) with layout randomness from rng."""
        scene = parse_caption(caption)
        size = float(self.image_size)
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]

        placements = []  # (colour, shape, cy, cx, r) in pixel units
        if scene.relation is None:
            (colour, shape), = scene.objects
            r = rng.uniform(0.2, 0.3) * size
            cy, cx = rng.uniform(r + 0.5, size - r - 0.5, size=2)
            placements.append((colour, shape, cy, cx, r))
        else:
            # The first object goes wholly inside the half its relation names, the second
            # wholly in the other half, so the relation holds for any reading of position
            # (centroid, bounding box). A 1.5 px margin to the midline leaves >= 3 px of
            # background between the shapes, so their antialiased edges never touch (the
            # checker separates them by connectivity). The other coordinate stays near the
            # middle (spread 0.2 S < the minimum 2r + 3 separation) so "above" never looks
            # more like "left of".
            first_low = scene.relation in ("above", "left of")  # first object at the low coordinate
            for i, (colour, shape) in enumerate(scene.objects):
                r = rng.uniform(0.15, 0.2) * size
                low_half = first_low == (i == 0)
                lo, hi = (r + 0.5, size / 2 - r - 1.5) if low_half else (size / 2 + r + 1.5, size - r - 0.5)
                main = rng.uniform(lo, hi)
                cross = rng.uniform(0.4, 0.6) * size
                cy, cx = (main, cross) if scene.relation in ("above", "below") else (cross, main)
                placements.append((colour, shape, cy, cx, r))

        n = self.image_size * SUPERSAMPLE
        coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # sub-pixel sample positions in pixel units
        ys, xs = coords[:, None], coords[None, :]
        image_HWC = np.empty((self.image_size, self.image_size, 3), np.float32)
        image_HWC[:] = BACKGROUNDS[background]
        for colour, shape, cy, cx, r in placements:
            mask = _shape_mask(shape, cy, cx, r, ys, xs)
            cover_HW = mask.reshape(self.image_size, SUPERSAMPLE, self.image_size, SUPERSAMPLE).mean(axis=(1, 3))
            cover_HW = cover_HW.astype(np.float32)[..., None]
            image_HWC = image_HWC * (1 - cover_HW) + np.array(COLOURS[colour], np.float32) * cover_HW
        return np.clip(np.rint(image_HWC), 0, 255).astype(np.uint8)


# ---- checking images against captions ---------------------------------------------------------
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32)


def classify_pixels(image_HWC: np.ndarray, max_distance: float = 64.0) -> np.ndarray:
    """Index into the palette (COLOURS then BACKGROUNDS) of each pixel's nearest colour, -1 if
    none is within max_distance (antialiased edges, muddy generated colours)."""
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


def _guess_shape(mask_HW: np.ndarray) -> str:
    # How much of its bounding box a blob fills separates squares (~1) from the rest;
    # a triangle (apex up) keeps only ~1/4 of its pixels in the upper half of its box.
    rows, cols = np.nonzero(mask_HW)
    fill = len(rows) / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    mid = (rows.max() + rows.min()) / 2
    upper = ((rows < mid).sum() + 0.5 * (rows == mid).sum()) / len(rows)
    if upper < 0.4:
        return "triangle"
    return "square" if fill > 0.93 else "circle"


def describe(image_HWC: np.ndarray, min_fraction: float = 0.01,
             max_distance: float = 64.0) -> list[tuple[str, str, tuple[float, float], float]]:
    """The shapes seen in an image: [(colour, shape guess, (row, col) centroid, pixel_fraction)],
    largest first, each colour measured on its largest connected blob; blobs covering less
    than min_fraction of the image are ignored as noise."""
    label_HW = classify_pixels(image_HWC, max_distance)
    found = []
    for i, name in enumerate(COLOURS):
        mask = largest_component(label_HW == i)
        fraction = float(mask.mean())
        if fraction >= min_fraction:
            rows, cols = np.nonzero(mask)
            found.append((name, _guess_shape(mask), (float(rows.mean()), float(cols.mean())), fraction))
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
