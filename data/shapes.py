"""The demo "shapes" world: procedural captioned images small enough to train on a laptop.

Each image is a plain light or dark background with one or two flat shapes
(circle, square, triangle) in six well-separated colours. Captions state what is
drawn and, for two shapes, how they sit relative to each other:

    "a red circle"
    "a red circle above a blue square"
    "an orange triangle to the left of a green circle"

The layout always follows the caption (the first shape sits wholly in the half
the relation names), so a checker that only finds colour centroids can score a
generated image against its prompt (data/shapes_check.py: `describe`, `score_caption`,
`caption_matches`).

Compositional hold-out: two-shape captions that contain one of `HELD_OUT_PAIRS`
(e.g. a purple triangle next to anything) never appear in the training stream,
although each held-out pair is still trained on alone ("a purple triangle").
`held_out_prompts()` are eight such compositions, used to see whether a model
composes what it learned separately.

A fine-tuning target: the palette has a seventh colour, pink (`CONCEPT`), that the
renderer and the checker know but the pretraining stream (`ShapesWorld.sample`)
never draws. Its word is in `all_captions()` / `vocabulary()`, so the tiny text
encoder built from them has a token for it, as a real encoder would. `ConceptWorld`
is the SFT stream: every sample shows pink, alone or next to a pretraining colour,
with a "train" and a disjoint "val" split. Two-shape scenes with a pink circle
(`CONCEPT_HELD_OUT_PAIRS`) are held out of both, the way HELD_OUT_PAIRS is:
`concept_prompts()` are eight of them, `concept_reference_prompts()` the same eight
with pink swapped for a colour pretraining knows (the base model's level on the
same layouts).

Everything is a pure function of (seed, index): `np.random.default_rng([seed, index])`
(ConceptWorld: [seed, index, stream tag, split]), never a global RNG, so any process
can render any sample id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Chosen far apart in RGB (every pair > 90 apart, backgrounds included) so
# nearest-palette classification stays unambiguous even on blurry generated samples;
# and no antialiased blend of a colour with a background comes within 64 (the
# checker's max_distance) of a third colour, so shape edges are never read as another
# colour. Pink is (255, 105, 190), not hot pink (255, 105, 180): a red edge on the
# light background passes 63 from that one.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 165, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (255, 140, 0),
    "pink": (255, 105, 190),
}
# The colour pretraining never draws (the fine-tuning target; see ConceptWorld).
CONCEPT = "pink"
# What ShapesWorld.sample draws from, in the order its random draws index.
PRETRAIN_COLOURS = tuple(c for c in COLOURS if c != CONCEPT)
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
# The same for the concept stream (both splits): a pink circle is seen alone, never in a pair.
CONCEPT_HELD_OUT_PAIRS = ((CONCEPT, "circle"),)

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

# One shape alone, every colour and shape of pretraining (a purple triangle and an orange
# circle included: held out of pairs only): can the model draw a thing at all.
_ONE_SHAPE_PROMPTS = (
    "a red circle",
    "a green triangle",
    "a blue square",
    "a yellow circle",
    "a purple triangle",
    "an orange circle",
    "a red square",
    "a blue triangle",
)

# Eight two-shape prompts with a (held-out) pink circle, every relation, pink first and
# second, each beside the colour its reference prompt uses instead of pink: one the
# base knows, not already in the prompt, making a pretraining caption.
_CONCEPT_PROMPTS = (
    ("a pink circle above a green square", "red"),
    ("a blue triangle below a pink circle", "yellow"),
    ("a pink circle to the left of a yellow triangle", "purple"),
    ("a red square to the right of a pink circle", "green"),
    ("a pink circle below an orange square", "blue"),
    ("a purple circle above a pink circle", "red"),
    ("a pink circle to the right of a blue square", "yellow"),
    ("a green triangle to the left of a pink circle", "red"),
)
# Pink compositions the concept stream does draw, with the colour of the reference prompt:
# learning the concept itself, where `_CONCEPT_PROMPTS` asks for compositions on top.
_CONCEPT_SEEN_PROMPTS = (
    ("a pink square above a green circle", "red"),
    ("a blue circle below a pink triangle", "yellow"),
    ("a pink triangle to the left of a yellow square", "red"),
    ("a red circle to the right of a pink square", "blue"),
    ("an orange triangle above a pink square", "green"),
    ("a pink square below a blue triangle", "yellow"),
    ("a green square to the right of a pink triangle", "blue"),
    ("a pink triangle above a red square", "green"),
)
_CONCEPT_TRAIN_PROMPTS = (
    "a pink circle",
    "a pink square",
    "a pink triangle",
    "a pink square above a green circle",
    "a blue circle below a pink triangle",
    "a pink triangle to the left of a yellow square",
    "a red circle to the right of a pink square",
    "an orange triangle above a pink square",
)

# Share of one-shape images in the pretraining stream. One shape is drawn larger (radius
# 0.2-0.3 of the image, against 0.15-0.2 in pairs) and at 0.25 the demo base drew pairs
# better than single shapes; docs/DEMO_RECIPE.md has the figures.
SINGLE_FRACTION = 0.4
CONCEPT_SINGLE_FRACTION = 0.25  # the same in the fine-tuning stream (ConceptWorld)
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


def is_concept_held_out(scene: Scene) -> bool:
    return len(scene.objects) == 2 and any(obj in CONCEPT_HELD_OUT_PAIRS for obj in scene.objects)


def has_concept(scene: Scene) -> bool:
    return any(colour == CONCEPT for colour, _ in scene.objects)


def concept_prompts() -> list[str]:
    """Eight fixed two-shape pink prompts that neither ConceptWorld split ever produces."""
    return [p for p, _ in _CONCEPT_PROMPTS]


def concept_seen_prompts() -> list[str]:
    """Eight fixed two-shape pink prompts of the concept stream's own distribution."""
    return [p for p, _ in _CONCEPT_SEEN_PROMPTS]


def concept_reference_prompts(seen: bool = False) -> list[str]:
    """`concept_prompts()` (or `concept_seen_prompts()`) with pink replaced by a pretraining
    colour (each a pretraining caption): how well the base draws the same layouts with a
    colour it knows."""
    out = []
    for prompt, colour in _CONCEPT_SEEN_PROMPTS if seen else _CONCEPT_PROMPTS:
        scene = parse_caption(prompt)
        objects = tuple((colour if c == CONCEPT else c, s) for c, s in scene.objects)
        out.append(scene_to_caption(Scene(objects, scene.relation)))
    return out


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
        """Every caption this world can draw (training, held out and pink), in a fixed order."""
        objects = [(c, s) for c in COLOURS for s in SHAPES]
        scenes = [Scene((o,)) for o in objects]
        for a, b in itertools.product(objects, objects):
            if a[0] != b[0]:
                scenes.extend(Scene((a, b), rel) for rel in RELATIONS)
        return [scene_to_caption(s) for s in scenes]

    def training_captions(self) -> list[str]:
        """The captions `sample` draws from: no held-out composition, no pink."""
        return [c for c in self.all_captions() if self._in_stream(parse_caption(c))]

    def _in_stream(self, scene: Scene) -> bool:
        return not is_held_out(scene) and not has_concept(scene)

    def held_out_prompts(self) -> list[str]:
        """Eight fixed two-shape prompts that the training stream never produces."""
        return list(_HELD_OUT_PROMPTS)

    def one_shape_prompts(self) -> list[str]:
        """Eight fixed one-shape prompts (all in the training stream)."""
        return list(_ONE_SHAPE_PROMPTS)

    def train_prompts_example(self) -> list[str]:
        """Eight fixed prompts from the training distribution (for sample grids)."""
        return list(_TRAIN_PROMPTS)

    def vocabulary(self) -> list[str]:
        """All words any caption uses, sorted."""
        return sorted({w for c in self.all_captions() for w in c.split()})

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def _draw_scene(self, rng: np.random.Generator) -> Scene:
        colours = PRETRAIN_COLOURS
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
        rng = self._rng(index)
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


class ConceptWorld(ShapesWorld):
    """The fine-tuning stream: every sample shows pink (`CONCEPT`), which pretraining never draws.

    A quarter are one pink shape; the rest pair a pink shape with one of another
    pretraining colour, in either order, with the layout rules of ShapesWorld. Neither
    split draws a held-out composition: HELD_OUT_PAIRS (kept for the base evaluation)
    and CONCEPT_HELD_OUT_PAIRS (a pink circle in a pair: `concept_prompts()`).
    `split` "train" and "val" draw the same caption distribution from independent
    random streams, so validation images are never training images. `render`, the
    vocabulary and the checker are ShapesWorld's.
    """

    SPLITS = ("train", "val")
    _STREAM = 0xC0C  # tags the concept streams apart from the pretraining one ([seed, index])

    def __init__(self, image_size: int = 32, seed: int = 0, split: str = "train", replay: float = 0.0):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"replay must be in [0, 1), got {replay}")
        super().__init__(image_size, seed)
        self.split = split
        # The share of samples drawn from the pretraining distribution instead: fine-tuning
        # on the new concept alone makes the model forget what it drew before.
        self.replay = replay

    def _in_stream(self, scene: Scene) -> bool:
        return has_concept(scene) and not is_held_out(scene) and not is_concept_held_out(scene)

    def held_out_prompts(self) -> list[str]:
        """The concept evaluation prompts, which neither split produces."""
        return concept_prompts()

    def train_prompts_example(self) -> list[str]:
        """Eight fixed prompts from the concept stream (for sample grids)."""
        return list(_CONCEPT_TRAIN_PROMPTS)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index), self._STREAM, self.SPLITS.index(self.split)])

    def _draw_scene(self, rng: np.random.Generator) -> Scene:
        if self.replay and rng.random() < self.replay:  # (no draw at replay 0: the stream stays as it was)
            return ShapesWorld._draw_scene(self, rng)
        if rng.random() < CONCEPT_SINGLE_FRACTION:
            return Scene(((CONCEPT, SHAPES[rng.integers(len(SHAPES))]),))
        while True:  # rejection keeps the draw a pure function of the rng state
            other = PRETRAIN_COLOURS[rng.integers(len(PRETRAIN_COLOURS))]
            s1, s2 = rng.integers(len(SHAPES), size=2)
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
            objects = ((CONCEPT, SHAPES[s1]), (other, SHAPES[s2]))
            scene = Scene(objects if rng.random() < 0.5 else objects[::-1], relation)
            if self._in_stream(scene):
                return scene
