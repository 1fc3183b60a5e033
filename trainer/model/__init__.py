"""The K2 diffusion transformer: model, sizes, FLOPs and checkpoint interop."""

from trainer.model.config import ModelConfig
from trainer.model.dit import K2DiT, patchify, positions, unpatchify
from trainer.model.flops import flops_per_sample
from trainer.model.interop import clean_name, load_pretrained, save_pretrained

__all__ = [
    "K2DiT",
    "clean_name",
    "ModelConfig",
    "patchify",
    "unpatchify",
    "positions",
    "flops_per_sample",
    "load_pretrained",
    "save_pretrained",
]
