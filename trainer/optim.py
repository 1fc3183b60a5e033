"""AdamW, the learning-rate schedules (warmup, then cosine, constant or WSD), and EMA weights."""

import math
import re

import torch
import torch.nn as nn

from trainer.config import OptimizerConfig
from trainer.model import clean_name

# A name segment that marks a norm weight or a modulation table (`blocks.3.mod`,
# `attn.q_norm.weight`, `norm1.weight`). Matched on whole segments of the model's own
# names: wrappers add segments like `_orig_mod`, which a substring test would take for `mod`.
_NO_DECAY = re.compile(r"(^|\.)(mod|\w*norm\w*)(\.|$)")
SCHEDULES = ("cosine", "constant", "wsd")


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices, except norm weights and modulation tables."""
    return p.ndim >= 2 and not _NO_DECAY.search(clean_name(name))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise ValueError(f"optimizer.name={cfg.name!r} is not supported (adamw)")
    # No weight decay on norms, biases and modulation tables: decaying a
    # zero-centred norm weight or a gate bias pulls it towards a fixed point that
    # has nothing to do with regularisation.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # On CUDA the fused kernel: one pass that reads and writes each tensor once (foreach
    # makes a pass per elementwise op, about three times the memory traffic), and it can
    # skip a step on the device from a found-inf flag (see `step_unless`), so a step needs
    # no host sync. Elsewhere foreach, whose CPU arithmetic resumed runs were pinned with.
    fused = bool(decay or no_decay) and all(p.is_cuda for p in decay + no_decay)
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kind)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_unless` can skip a step without the host reading the flag."""
    return all(group.get("fused") for group in optimizer.param_groups)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() that leaves weights, moments and the step count untouched where
    the 0-dim bool `skip` is True, decided on the device (a fused optimizer reads it as
    the found-inf flag of mixed-precision loss scaling)."""
    assert skips_on_device(optimizer), "step_unless needs a fused optimizer"
    optimizer.found_inf = skip.to(torch.float32)
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None


def validate_schedule(cfg: OptimizerConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r} is not one of {list(SCHEDULES)}")
    if not 0.0 < cfg.decay_fraction <= 1.0:
        raise ValueError(f"optimizer.decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    if cfg.lr <= 0 or cfg.warmup_steps < 0:
        raise ValueError(f"optimizer.lr must be positive and warmup_steps >= 0, got {cfg.lr} and {cfg.warmup_steps}")


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Linear warmup to cfg.lr, then by cfg.schedule:
    - cosine: down to cfg.lr * min_lr_ratio at total_steps;
    - constant: cfg.lr;
    - wsd (warmup-stable-decay): cfg.lr until the last decay_fraction of the steps, then
      linear down to cfg.lr * min_lr_ratio at total_steps.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = total_steps - max(1, round(cfg.decay_fraction * total_steps))
        if step < max(decay_start, cfg.warmup_steps):
            return cfg.lr
        span = max(1, total_steps - max(decay_start, cfg.warmup_steps))
        progress = min(1.0, (step - max(decay_start, cfg.warmup_steps)) / span)
        return cfg.lr + (floor - cfg.lr) * progress
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of the parameters, in fp32, sharded like them.

    Under FSDP2 each rank averages only its own shards (the parameters are
    DTensors), so EMA costs 4 bytes per parameter divided by the shard count.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # The model's own names: checkpoints of runs with AC or compile load into a plain model.
        self.names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) · (param - shadow). `applied`: a 0-dim device bool; where it
        is False the average stays as it is (a skipped step), with no host sync."""
        if applied is None:
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)
            return
        weight = applied.to(torch.float32) * (1.0 - self.decay)
        # Elementwise, so each rank's local shards are averaged alone (a plain 0-dim weight
        # does not mix with DTensors inside one kernel).
        for s, p in zip(self.shadow, self.params):
            _local(s).lerp_(_local(p.detach()).float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(sd)
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(sd[n])

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges live and EMA weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s.to(p.dtype))
            s.copy_(tmp.float())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
