"""A toy preference for the RL stage tests: brighter images are better.

Named by module path (`++stage.dpo.rewards={rubric:0.0,tests/rl/toy_rewards:1.0}`), the way a user
plugs in a reward of their own; a tiny untrained model has no rubric score to rank by,
but its samples differ in brightness from the first step.
"""

import numpy as np
import torch

from rl.rewards import Reward, RewardOutput, check_inputs


class Brightness(Reward):
    name = "brightness"

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_inputs(images_BHWC, prompts)
        return RewardOutput(torch.from_numpy(images_BHWC.reshape(len(prompts), -1).mean(1) / 255.0).float())


def build(world=None, **options) -> Reward:
    return Brightness(**options)
