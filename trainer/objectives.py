"""Training objectives: what one stage computes from a batch.

The loop (trainer/loop.py) owns batching, accumulation, the optimizer,
checkpoints and logging; an objective only turns a batch into a loss. Pretrain,
midtrain and SFT share `FlowObjective` and differ in data and schedule;
preference optimisation, GRPO and distillation register their own class here
and keep any extra models or state in `state_dict()`, which the checkpoint
saves beside the model.
"""

import hashlib

import torch
import torch.nn as nn

from data.batch import Batch
from trainer.config import StageConfig
from trainer.flow import flow_loss, interpolate, sample_timesteps
from trainer.model import ModelConfig, patchify, positions


def sample_seed(seed: int, sample_id: int, purpose: str) -> int:
    """A 63-bit seed per (run seed, sample, purpose): noise does not depend on
    which rank, micro-batch or world size the sample landed in."""
    h = hashlib.blake2b(f"{seed}:{sample_id}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def per_sample_randn(shape: tuple[int, ...], ids: torch.Tensor, seed: int, purpose: str) -> torch.Tensor:
    g = torch.Generator()
    out = []
    for sid in ids.tolist():
        g.manual_seed(sample_seed(seed, sid, purpose))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


class Objective:
    def attach(self, model: nn.Module) -> None:
        """Adds trainable extras to `model.aux` before the model is sharded (default: none)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        pass


class FlowObjective(Objective):
    """Velocity regression on x_t = (1-t) x0 + t eps with shifted logit-normal t."""

    def __init__(self, stage: StageConfig, model_cfg: ModelConfig, seed: int):
        self.flow = stage.flow
        self.patch = model_cfg.patch_size
        self.seed = seed

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x0_BLC = patchify(batch.latents, self.patch)
        B, L, C = x0_BLC.shape
        h, w = batch.latents.shape[-2] // self.patch, batch.latents.shape[-1] // self.patch
        device = x0_BLC.device
        eps_BLC = per_sample_randn((L, C), batch.sample_ids, self.seed, "noise").to(device, x0_BLC.dtype)
        u_B = per_sample_randn((), batch.sample_ids, self.seed, "time").to(device)
        t_B = sample_timesteps(u_B, L, self.flow)
        xt_BLC = interpolate(x0_BLC, eps_BLC, t_B)
        pos_S3 = positions(batch.text.shape[1], h, w).to(device)
        v_BLC = model(xt_BLC, batch.text, t_B, pos_S3, batch.text_mask)
        return flow_loss(v_BLC, x0_BLC, eps_BLC), {}


OBJECTIVES = {"flow": FlowObjective}


def build_objective(stage: StageConfig, model_cfg: ModelConfig, seed: int) -> Objective:
    if stage.objective not in OBJECTIVES:
        raise ValueError(f"stage.objective={stage.objective!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[stage.objective](stage, model_cfg, seed)
