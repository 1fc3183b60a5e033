"""Diversity reward: how far each image's embedding lies from the rest of its rollout group.

GRPO rewards an image relative to the other images of its prompt, and a policy can raise
every reward it is given by drawing the one style that scores best each time: the group
collapses onto one look. Krea pays for DINOv3 embedding diversity across rollout groups to
stop that collapse; here the embeddings come from any open_clip image tower
(rl.rewards.embed), by default the tiny random one of the demo.

For image i of group G (the images of the batch with i's prompt, compared as strings),

    score_i = 1 / (|G| - 1) * sum_{j in G, j != i} (1 - cos(e_i, e_j))

the mean cosine distance to the other members. A group of one has nothing to differ from
and scores 0; identical images score 0. Cosine distance lies in [0, 2]: the scores leave
[0, 1] only when a group's embeddings point apart by more than 90 degrees, which image
towers, whose embeddings share a common direction, rarely give.

details: {"diversity": the scores}.
"""

from __future__ import annotations

import numpy as np
import torch

from rl.rewards import Reward, RewardOutput, check_inputs
from rl.rewards.embed import DEFAULT_MODEL, ImageEmbedder


def group_cosine_distance(embeddings_BD: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per row, the mean 1 - cos to the other rows of the same prompt (0 for a group of
    one), in float64 from the given embeddings; float32 (B,)."""
    e = torch.nn.functional.normalize(embeddings_BD.double(), dim=-1)
    scores = torch.zeros(len(prompts), dtype=torch.float64)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        idx = torch.tensor(members)
        distance = 1 - e[idx] @ e[idx].T
        # the diagonal is 1 - |e|^2, zero up to rounding: left out, not counted as a member
        scores[idx] = (distance.sum(1) - distance.diagonal()) / (len(members) - 1)
    return scores.float()


class DiversityReward(Reward):
    """Mean cosine distance of each image's embedding to the rest of its prompt's group
    (see the module docstring)."""

    name = "diversity"

    def __init__(self, embedder: ImageEmbedder):
        self.embedder = embedder

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_inputs(images_BHWC, prompts)
        scores = group_cosine_distance(self.embedder(images_BHWC), list(prompts))
        return RewardOutput(scores, {"diversity": scores.clone()})


def build(world=None, model: str = DEFAULT_MODEL, pretrained: str | None = None, **options) -> DiversityReward:
    """The registry's entry (rl.rewards.build_reward): options {"model": open_clip name,
    "pretrained": tag or checkpoint path, "init_seed", "device", "batch_size"}; any world."""
    return DiversityReward(ImageEmbedder.load(model, pretrained, **options))
