"""The torchtitan components k2train uses, behind one thin adapter.

torchtitan's `Trainer` and its FSDP helper do not import on every torch we
run on (torch 2.11 on the GPU machines), so the loop and the sharding are our
own; what we take from it is imported here and nowhere else, so a torchtitan
upgrade touches one file.
"""

import logging

import torch

from torchtitan.distributed.utils import clip_grad_norm_ as _titan_clip_grad_norm
from torchtitan.tools.utils import get_peak_flops


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Global grad norm over (possibly DTensor-sharded) parameters, clipped to max_norm.

    max_norm <= 0 only measures. Returns a plain scalar tensor on every rank.
    """
    params = [p for p in params if p.grad is not None]
    norm = _titan_clip_grad_norm(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None on CPU (no meaningful MFU)."""
    if device.type != "cuda":
        return None
    # get_peak_flops shells out to lspci to tell H100 SXM from PCIe and logs an
    # error where lspci is missing; the device name is enough for us.
    titan_log = logging.getLogger("torchtitan")
    level = titan_log.level
    titan_log.setLevel(logging.CRITICAL)
    try:
        return float(get_peak_flops(torch.cuda.get_device_name(device)))
    finally:
        titan_log.setLevel(level)
