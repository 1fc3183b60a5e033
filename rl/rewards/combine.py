"""Several rewards as one: a weighted mean, and per-reward group advantages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rl.rewards import Reward, RewardOutput, check_inputs, group_advantages


class WeightedReward(Reward):
    """scores = sum_k w_k s_k / sum_k w_k over the component rewards.

    details: each component's scores under its name, and its own details under
    "<name>/<key>" (e.g. "rubric/spatial"). A weight of 0 keeps a reward in the details
    (logged) without counting it.
    """

    name = "weighted"

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        names = [r.name for r in rewards]
        if not rewards or len(weights) != len(rewards):
            raise ValueError(f"need one weight per reward, got {len(weights)} weights for rewards {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (they key the details), got {names}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {dict(zip(names, weights))}")
        self.rewards = list(rewards)
        self.weights = {name: float(w) for name, w in zip(names, weights)}

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_inputs(images_BHWC, prompts)
        details, total = {}, 0.0
        for reward in self.rewards:
            out = reward(images_BHWC, prompts)
            details[reward.name] = out.scores
            details.update({f"{reward.name}/{key}": value for key, value in out.details.items()})
            total = total + self.weights[reward.name] * out.scores.double()
        scores = (total / sum(self.weights.values())).float()
        return RewardOutput(scores, details)

    def advantages(self, output: RewardOutput, group_ids_B: torch.Tensor, clip: float | None = 5.0,
                   eps: float = 1e-4) -> torch.Tensor:
        """Per-reward group advantages, combined: sum_k w_k A_k / sum_k w_k, then clipped.

        A_k normalises component k within each group on its own (`group_advantages`
        unclipped), so a reward with a small spread across a group (a VLM's P("Yes")
        moving by 0.01) weighs as much as one that jumps between 0 and 1, and the
        weights alone set their balance; normalising the weighted sum instead lets the
        widest-spread reward decide. Each A_k has mean 0 per group, so the combination
        does too before clipping.
        """
        total = 0.0
        for name, w in self.weights.items():
            total = total + w * group_advantages(output.details[name], group_ids_B, clip=None, eps=eps).double()
        adv = total / sum(self.weights.values())
        if clip is not None:
            adv = adv.clamp(-clip, clip)
        return adv.float()
