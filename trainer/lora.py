"""LoRA adapters on the DiT, through peft.

A LoRA run trains W' = W + (alpha / rank) · B A on chosen linears, with the base
W frozen. Three facts the rest of the trainer relies on:

- Adapters are injected after the base weights are loaded (init_from) and before
  activation checkpointing, compile and FSDP wrap the blocks, so the base really
  is the checkpoint's and the adapters are sharded with their block.
- Only the adapters require grad: the optimizer, the EMA and the checkpoint see
  them alone (a LoRA checkpoint is megabytes, its base is recorded by path).
- Saved names are the model's own without peft's adapter name:
  `blocks.0.attn.q.lora_A.weight` (A: rank × in) and `….lora_B.weight`
  (B: out × rank). That is also peft's own file naming, and what
  trainer/lora_io.py converts to diffusers' and ComfyUI's key names.
"""

import re

import torch
import torch.nn as nn

from trainer.config import LoraConfig
from trainer.model.config import ModelConfig

ADAPTER = "default"  # peft's adapter name; never written to disk (trainer.model.interop.clean_name)
# Linears a LoRA may target inside a block (K2DiT names).
BLOCK_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.gate", "attn.out", "mlp.w_gate", "mlp.w_up", "mlp.w_down")


def alpha_of(cfg: LoraConfig) -> float:
    return float(cfg.alpha if cfg.alpha is not None else cfg.rank)


def validate_lora(cfg: LoraConfig) -> None:
    if cfg.rank < 0:
        raise ValueError(f"stage.lora.rank must be >= 0, got {cfg.rank}")
    if cfg.rank == 0:
        return
    bad = [t for t in cfg.targets if t not in BLOCK_LINEARS]
    if bad or not cfg.targets:
        raise ValueError(f"stage.lora.targets {bad or '[]'}: choose from {list(BLOCK_LINEARS)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"stage.lora.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise ValueError(f"stage.lora.alpha must be positive, got {cfg.alpha}")


def target_pattern(cfg: LoraConfig) -> str:
    """A regex peft full-matches against module names: the targets inside the main blocks
    (and the text-fusion blocks when cfg.text_fusion)."""
    containers = [r"blocks"] + ([r"text_fusion\.layerwise", r"text_fusion\.refiner"] if cfg.text_fusion else [])
    leaves = "|".join(re.escape(t) for t in cfg.targets)
    return rf"^({'|'.join(containers)})\.\d+\.({leaves})$"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Injects adapters in place (B = 0, so the model's output is unchanged) and freezes the rest."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    validate_lora(cfg)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=alpha_of(cfg), lora_dropout=cfg.dropout,
                              target_modules=target_pattern(cfg), bias="none")
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage.lora.targets={cfg.targets} matched no module of the model")
    # With the embeddings frozen, the first block's input would not require grad, and a
    # compiled activation-checkpointed block whose inputs need no grad is traced in a mode
    # that refuses it ("does not support RNG ops in recompute regions"). Marking the
    # block inputs as requiring grad costs one extra input gradient in the first block.
    model.img_in.register_forward_hook(_require_grad)
    return model


def _require_grad(module, args, out):
    if torch.is_grad_enabled() and not out.requires_grad:
        out.requires_grad_(True)
    return out


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_layers(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{saved adapter names → tensors} → {base linear name: (A, B)}; ValueError for a half pair."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if m is None:
            raise ValueError(f"{name!r} is not a LoRA weight (expected <module>.lora_A.weight / .lora_B.weight)")
        layers.setdefault(m.group(1), {})[m.group(2)] = value
    half = sorted(k for k, v in layers.items() if len(v) != 2)
    if half:
        raise ValueError(f"LoRA weights without their pair (A and B): {half[:5]}")
    return {k: (v["A"], v["B"]) for k, v in layers.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, sd: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale · B A for every adapted linear of a plain (un-injected) model.

    `scale` is the whole factor (alpha / rank × the user's strength). The product is
    formed in float64 so a merge adds no rounding of its own beyond the final cast.
    """
    modules = dict(model.named_modules())
    for name, (A, B) in adapter_layers(sd).items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LoRA weight {name}.lora_A.weight: the model has no linear {name!r}")
        W = linear.weight
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise ValueError(f"LoRA weight {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit the "
                             f"linear's weight {tuple(W.shape)} (B @ A must be out × in)")
        delta = scale * (B.double() @ A.double())
        W.copy_((W.double() + delta.to(W.device)).to(W.dtype))


def lora_layers_for(cfg: ModelConfig, lora: LoraConfig) -> list[str]:
    """The linears a LoRA config adapts on a model config (for checks and docs)."""
    pattern = re.compile(target_pattern(lora))
    from trainer.model import build_on_meta

    return [n for n, m in build_on_meta(cfg).named_modules() if isinstance(m, nn.Linear) and pattern.match(n)]
