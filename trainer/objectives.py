"""The losses of the flow stage (trainer/stage.py:FlowStage): what one batch costs.

Pretrain, midtrain and SFT share `FlowObjective` and differ in data and schedule;
`stage.objective` picks one. The stage owns the models, optimizers and the step;
an objective only turns a batch into a loss.

What the flow stage calls, in order:
    objective.attach(model)      once, before weights are loaded, LoRA and sharding:
                                 trainable extras go into model.aux
    objective.set_step(step)     before each optimizer step's micro-batches
    loss, metrics = objective.loss(model, batch)
                                 metrics: name -> detached 0-dim tensor (no host sync);
                                 averaged over micro-batches, float() when logging
"""

import hashlib

import torch
import torch.nn as nn

from data.batch import Batch
from trainer.config import StageConfig
from trainer.flow import flow_loss, interpolate, sample_timesteps
from trainer.model import ModelConfig, patchify, positions
from trainer.repa import alignment_loss, build_projector, target_grid, validate_repa


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
    # The optimizer step being computed; None until the loop first calls set_step.
    step: int | None = None

    def attach(self, model: nn.Module) -> None:
        """Adds trainable extras to `model.aux` before the model is sharded (default: none)."""

    def set_step(self, step: int) -> None:
        """Called by the loop before each optimizer step's micro-batches (for step-dependent terms)."""
        self.step = step

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    def noised(self, batch: Batch) -> dict[str, torch.Tensor | tuple[int, int]]:
        """x0, eps, t, x_t (tokens), RoPE positions and the (h, w) token grid of a batch."""
        x0_BLC = patchify(batch.latents, self.patch)
        B, L, C = x0_BLC.shape
        h, w = batch.latents.shape[-2] // self.patch, batch.latents.shape[-1] // self.patch
        device = x0_BLC.device
        eps_BLC = per_sample_randn((L, C), batch.sample_ids, self.seed, "noise").to(device, x0_BLC.dtype)
        u_B = per_sample_randn((), batch.sample_ids, self.seed, "time").to(device)
        t_B = sample_timesteps(u_B, L, self.flow)
        xt_BLC = interpolate(x0_BLC, eps_BLC, t_B)
        pos_S3 = positions(batch.text.shape[1], h, w).to(device)
        return {"x0": x0_BLC, "eps": eps_BLC, "t": t_B, "xt": xt_BLC, "pos": pos_S3, "grid": (h, w)}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.noised(batch)
        v_BLC = model(n["xt"], batch.text, n["t"], n["pos"], batch.text_mask)
        return flow_loss(v_BLC, n["x0"], n["eps"]), {}


class FlowRepaObjective(FlowObjective):
    """Flow matching plus iREPA alignment (trainer/repa.py) until stage.repa.stop_step.

    loss = flow + weight * align, with align = -mean cos(projector(block output), normalised
    targets); targets are `batch.repa` (B, N, Dv), the clean image's vision-encoder patch
    features. From stop_step on the loss is the flow term alone: the block's hidden
    states are not requested and the projector neither runs nor gets a gradient.
    """

    def __init__(self, stage: StageConfig, model_cfg: ModelConfig, seed: int):
        super().__init__(stage, model_cfg, seed)
        validate_repa(stage.repa, model_cfg.num_blocks)
        self.repa = stage.repa
        self.dim = model_cfg.dim

    def attach(self, model: nn.Module) -> None:
        if "repa" in model.aux:
            return  # attached already (a second setup on the same model)
        param = next(model.parameters())
        projector = build_projector(self.repa, self.dim, self.seed)
        model.aux["repa"] = projector.to(param.device, param.dtype)

    def active(self) -> bool:
        if self.repa.stop_step is None:
            return self.repa.weight > 0
        if self.step is None:
            # Without the step a stop_step would be silently ignored: fail instead.
            raise ValueError("stage.repa.stop_step needs the step: the loop must call objective.set_step(step) "
                             "before each optimizer step")
        return self.repa.weight > 0 and self.step < self.repa.stop_step

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.active():
            flow, _ = super().loss(model, batch)
            return flow, {"flow": flow.detach()}
        targets_BND = batch.repa
        if targets_BND is None:
            raise ValueError("objective flow_repa needs REPA targets (batch.repa): write the shards with a "
                             "vision encoder, or use objective flow")
        if "repa" not in model.aux:
            raise ValueError("the REPA projector is not attached: call objective.attach(model) before parallelize")
        n = self.noised(batch)
        v_BLC, hidden_BLD = model(n["xt"], batch.text, n["t"], n["pos"], batch.text_mask,
                                  return_hidden_block=self.repa.block)
        flow = flow_loss(v_BLC, n["x0"], n["eps"])
        h, w = n["grid"]
        pred_BND = model.aux["repa"](hidden_BLD, (h, w), target_grid(targets_BND.shape[1], h, w))
        align = alignment_loss(pred_BND, targets_BND.to(pred_BND.device))
        return flow + self.repa.weight * align, {"flow": flow.detach(), "repa_align": align.detach()}


OBJECTIVES = {"flow": FlowObjective, "flow_repa": FlowRepaObjective}


def build_objective(stage: StageConfig, model_cfg: ModelConfig, seed: int) -> Objective:
    if stage.objective not in OBJECTIVES:
        raise ValueError(f"stage.objective={stage.objective!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[stage.objective](stage, model_cfg, seed)
