"""AdamW, the warmup + cosine schedule, and EMA weights."""

import math

import torch
import torch.nn as nn

from trainer.config import OptimizerConfig


NO_DECAY = ("mod", "norm", "table")


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
        (decay if p.ndim >= 2 and not any(k in name for k in NO_DECAY) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at total_steps.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
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
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

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
