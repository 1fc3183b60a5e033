"""Rewards for the RL stages: batched, each a small class behind one interface.

    reward(images_BHWC, prompts) -> RewardOutput(scores_B, details)

`images_BHWC` is RGB uint8 numpy (B, H, W, 3), the format the shapes world renders and
its checker reads; a stage holding decoded float images in [-1, 1] (B, 3, H, W)
converts them once with `data.latents.images_to_uint8(images).numpy()`. `prompts` has
one prompt per image. `scores` is float32 (B,) in [0, 1] (diversity: [0, 2]); `details`
maps a name to a float32 (B,) tensor of per-image values (per-requirement-kind pass rates,
per-component scores) that a stage averages for its log.

The rewards:
    rubric    ShapesRubricReward (rubric.py): the prompt split into verifiable
              requirements, each checked exactly by the shapes world's own checker
    vlm       VLMYesNoReward (vlm.py): P("Yes") of a Qwen3-VL asked each requirement
    weighted  WeightedReward (combine.py): a weighted mean of several
    artifact  ArtifactReward (artifact.py): P(clean) from a logistic head on open_clip image
              embeddings, trained on world images against JPEG-blocked, noisy, gridded and
              over-saturated copies (`python -m rl.rewards.artifact --out DIR`).
              Options: path (the head folder, required), device, batch_size
    diversity DiversityReward (diversity.py): each image's mean cosine distance (1 - cos,
              in [0, 2]) to the other images of its prompt's group; 0 alone.
              Options: model (open_clip name, default the tiny random "k2-tiny-resnet"),
              pretrained (tag or checkpoint path), init_seed, device, batch_size

`build_reward({"rubric": 1.0, "vlm": 0.5}, world, options={"vlm": {"path": ...}})`
builds them by name from a stage's config; `group_advantages` turns scores into GRPO's
group-relative advantages.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RewardOutput:
    """scores: float32 (B,) in [0, 1]; details: name -> float32 (B,) per-image values."""

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)


class Reward:
    """The interface: `reward(images_BHWC uint8 numpy, prompts) -> RewardOutput`, and a `name`
    (the key of its values in a combined reward's details and in the logs)."""

    name: str = "reward"

    def __call__(self, images_BHWC: np.ndarray, prompts: list[str]) -> RewardOutput:
        raise NotImplementedError


def check_inputs(images_BHWC: np.ndarray, prompts: list[str]) -> None:
    """ValueError unless images are RGB uint8 numpy (B, H, W, 3) with one prompt each."""
    if not isinstance(images_BHWC, np.ndarray) or images_BHWC.dtype != np.uint8 \
            or images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
        what = f"{type(images_BHWC).__name__} {getattr(images_BHWC, 'dtype', '')} {getattr(images_BHWC, 'shape', '')}"
        raise ValueError(f"rewards take RGB uint8 numpy images (B, H, W, 3), got {what}; convert float images "
                         f"in [-1, 1] with data.latents.images_to_uint8(images).numpy()")
    if isinstance(prompts, str) or len(prompts) != len(images_BHWC):
        raise ValueError(f"rewards take one prompt per image: {len(images_BHWC)} images, "
                         f"prompts={prompts if isinstance(prompts, str) else len(prompts)}")


def group_advantages(scores_B: torch.Tensor, group_ids_B: torch.Tensor, clip: float | None = 5.0,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages: (x - mean_group) / (std_group + eps), then clipped
    to +-clip (None: not clipped). float32 (B,).

    Groups are the images of one prompt, named by any integer ids (need not be contiguous
    or sorted). std is the population std of the group (Flow-GRPO's per-prompt tracker
    uses np.std); eps = 1e-4 as in Flow-GRPO and TRL. A group whose rewards are all
    equal gets advantage 0. Before clipping every group's advantages sum to 0; clipping
    can move a group's mean off 0, which is why it sits at a generous 5.
    """
    if scores_B.ndim != 1 or group_ids_B.shape != scores_B.shape:
        raise ValueError(f"scores and group ids must both be (B,), got {tuple(scores_B.shape)} "
                         f"and {tuple(group_ids_B.shape)}")
    x = scores_B.detach().double()
    _, group = torch.unique(group_ids_B.to(x.device), return_inverse=True)
    num_groups = int(group.max()) + 1
    count = torch.bincount(group, minlength=num_groups).double()
    mean = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, group, x) / count
    centred = x - mean[group]
    var = torch.zeros_like(mean).index_add_(0, group, centred * centred) / count
    adv = centred / (var.sqrt()[group] + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.float()


# Name -> module; each module has `build(world, **options) -> Reward`. Imported on use,
# so a stage that only needs the rubric never imports transformers' or open_clip's models.
REWARDS = {"rubric": "rl.rewards.rubric", "vlm": "rl.rewards.vlm", "artifact": "rl.rewards.artifact",
           "diversity": "rl.rewards.diversity"}


def build_reward(weights: Mapping[str, float], world=None,
                 options: Mapping[str, Mapping] | None = None) -> Reward:
    """A `WeightedReward` of the rewards named in `weights` (name -> weight, >= 0; a weight
    of 0 computes and logs a reward without training on it).

    `world` is the data world the prompts come from (the rubric checks that it is the
    shapes world); `options` gives a reward's constructor arguments by name, e.g.
    {"vlm": {"path": "/ckpt/Qwen3-VL-4B-Instruct"}}.
    """
    from rl.rewards.combine import WeightedReward

    options = dict(options or {})
    # A name with a slash is a module path of the user's ("my/rewards" for my.rewards; a dot
    # would be a config path to Hydra) with the same `build(world, **options)`.
    unknown = sorted(n for n in weights if n not in REWARDS and "/" not in n) + sorted(set(options) - set(weights))
    if unknown:
        raise ValueError(f"unknown or unweighted rewards {unknown}: rewards are {sorted(REWARDS)} or a module "
                         f"path with build(world, **options); options must name a reward in weights {sorted(weights)}")
    rewards = []
    for name in weights:
        try:
            module = importlib.import_module(REWARDS.get(name, name.replace("/", ".")))
        except ImportError as e:
            raise ValueError(f"reward {name!r}: cannot import its module ({e})") from e
        rewards.append(module.build(world, **options.get(name, {})))
    return WeightedReward(rewards, list(weights.values()))


__all__ = ["REWARDS", "Reward", "RewardOutput", "build_reward", "check_inputs", "group_advantages"]
