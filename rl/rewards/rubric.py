"""Rubric rewards: a shapes-world prompt as a list of verifiable requirements.

`decompose("a red circle above a green square")` gives, in this order:

    entity     entity:red                "red is present"                    "Is there a red object?"
    attribute  attribute:red:circle      "the red object is a circle"        "Is the red object a circle?"
    entity     entity:green              ...
    attribute  attribute:green:square    ...
    count      count:2                   "exactly 2 objects are present"     "Are there exactly two objects?"
    spatial    spatial:red:above:green   "the red circle is above the green square"
                                         "Is the red circle above the green square?"

`ShapesRubricReward` checks each with the world's exact checker (`data.shapes_check.describe`,
which finds one blob per palette colour, and `relation_holds`) and scores the mean of the
0/1 results (RubricRL-style partial credit). Together the requirements are exactly
`score_caption`: the captioned colours present and no other (entity + count), each the
captioned shape (attribute), the centroids in the captioned relation (spatial); so all
pass iff score_caption's colours, shapes and relation are all True. The questions are
what `VLMYesNoReward` asks a VLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.shapes import RELATIONS, ShapesWorld, _article, parse_caption
from data.shapes_check import blobs, describe, relation_holds, shape_margin
from rl.rewards import Reward, RewardOutput, check_inputs

KINDS = ("entity", "attribute", "count", "spatial")
_NUMBERS = {1: "one", 2: "two"}


@dataclass(frozen=True)
class Requirement:
    """One verifiable part of a prompt.

    kind: one of KINDS. id: canonical, unique within a prompt ("attribute:red:circle").
    statement: what must hold. question: the same as a yes/no question for a VLM.
    args: what the checker compares: (colour,) for entity, (colour, shape) for attribute,
    (count,) for count, (first colour, relation, second colour) for spatial, with the
    relation a key of data.shapes.RELATIONS.
    """

    kind: str
    id: str
    statement: str
    question: str
    args: tuple


def decompose(prompt: str) -> list[Requirement]:
    """The requirements of a shapes-world prompt; ValueError naming the prompt if the world cannot draw it."""
    try:
        scene = parse_caption(prompt)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r} is not a shapes-world caption: {e}") from None
    out = []
    for colour, shape in scene.objects:
        out.append(Requirement("entity", f"entity:{colour}", f"{colour} is present",
                               f"Is there {_article(colour)} {colour} object?", (colour,)))
        out.append(Requirement("attribute", f"attribute:{colour}:{shape}", f"the {colour} object is a {shape}",
                               f"Is the {colour} object a {shape}?", (colour, shape)))
    n = len(scene.objects)
    plural = n > 1
    out.append(Requirement("count", f"count:{n}", f"exactly {n} object{'s are' if plural else ' is'} present",
                           f"{'Are' if plural else 'Is'} there exactly {_NUMBERS[n]} object{'s' if plural else ''}?",
                           (n,)))
    if scene.relation is not None:
        (c1, s1), (c2, s2) = scene.objects
        words = " ".join(RELATIONS[scene.relation])
        out.append(Requirement("spatial", f"spatial:{c1}:{scene.relation.replace(' ', '_')}:{c2}",
                               f"the {c1} {s1} is {words} the {c2} {s2}",
                               f"Is the {c1} {s1} {words} the {c2} {s2}?", (c1, scene.relation, c2)))
    return out


def kind_details(values: list[list[tuple[str, float]]]) -> dict[str, torch.Tensor]:
    """Per image, the mean value of each requirement kind: {kind: float32 (B,)} from
    [(kind, value) per requirement] per image.

    A one-object prompt has no spatial requirement; its "spatial" is 1.0, score_caption's
    convention for the relation of a one-shape caption, so logged means never see NaN.
    """
    out = {}
    for kind in KINDS:
        per_image = []
        for reqs in values:
            of_kind = [v for k, v in reqs if k == kind]
            per_image.append(float(np.mean(of_kind)) if of_kind else 1.0)
        out[kind] = torch.tensor(per_image, dtype=torch.float32)
    return out


class ShapesRubricReward(Reward):
    """Mean pass rate of a prompt's requirements, checked exactly on the image.

    details: per-kind pass rates ("entity", "attribute", "count", "spatial"; see
    `kind_details`) and "all" (1.0 where every requirement passes), always the exact 0/1
    results. `min_fraction` is the checker's noise floor (blobs smaller than this share of
    the image are not objects), score_caption's default.

    soft > 0 scores each attribute requirement (the object's shape) by how far its blob is
    inside the verifier's region for that shape, sigmoid(data.shapes_check.shape_margin / soft),
    instead of 0/1: a square that nearly fills its box then scores above one that is a
    rounded blob, though both fail, so a group whose images all fail (or all pass) still
    has advantages. A missing object scores 0. The score is above 1/2 exactly where the
    exact check passes.
    """

    name = "rubric"

    def __init__(self, min_fraction: float = 0.01, soft: float = 0.0):
        if soft < 0:
            raise ValueError(f"rubric option soft must be >= 0 (0: exact 0/1 scores), got {soft}")
        self.min_fraction = min_fraction
        self.soft = soft

    def check(self, image_HWC: np.ndarray, requirements: list[Requirement]) -> list[bool]:
        """Each requirement's result on one image."""
        return [ok for ok, _ in self._check(image_HWC, requirements)]

    def _check(self, image_HWC: np.ndarray, requirements: list[Requirement]) -> list[tuple[bool, float]]:
        """(exact result, score) of each requirement on one image."""
        seen = {colour: (shape, rc) for colour, shape, rc, _ in describe(image_HWC, self.min_fraction)}
        masks = blobs(image_HWC, self.min_fraction) if self.soft else {}
        results = []
        for req in requirements:
            score = None
            if req.kind == "entity":
                ok = req.args[0] in seen
            elif req.kind == "attribute":
                colour, shape = req.args
                ok = colour in seen and seen[colour][0] == shape
                if self.soft:
                    score = 1 / (1 + np.exp(-shape_margin(masks[colour], shape) / self.soft)) if colour in seen else 0.0
            elif req.kind == "count":
                ok = len(seen) == req.args[0]  # one blob per colour: distinct colours seen
            else:
                first, relation, second = req.args
                ok = first in seen and second in seen and relation_holds(relation, seen[first][1], seen[second][1])
            results.append((ok, float(ok) if score is None else float(score)))
        return results

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_inputs(images_BHWC, prompts)
        values, scores, all_pass = [], [], []
        for image, prompt in zip(images_BHWC, prompts):
            reqs = decompose(prompt)
            results = self._check(image, reqs)
            values.append([(r.kind, float(ok)) for r, (ok, _) in zip(reqs, results)])
            scores.append(float(np.mean([score for _, score in results])))
            all_pass.append(float(all(ok for ok, _ in results)))
        details = kind_details(values)
        details["all"] = torch.tensor(all_pass, dtype=torch.float32)
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), details)


def build(world=None, **options) -> ShapesRubricReward:
    """The registry's entry (rl.rewards.build_reward): the rubric checks shapes-world images only."""
    if world is not None and not isinstance(world, ShapesWorld):
        raise ValueError(f"the rubric reward checks shapes-world images, got a {type(world).__name__} world")
    return ShapesRubricReward(**options)
