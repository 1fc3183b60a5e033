"""One entry point from a DataConfig to what the trainer consumes."""

import torch

from data.config import DataConfig
from data.shapes_loader import ShapesData, build_shapes_data
from data.synthetic import SyntheticLatents, SyntheticLoader


def build_data(cfg: DataConfig, cache_dir: str, batch_size: int, rank: int, world_size: int,
               device: torch.device, text_dim: int) -> ShapesData:
    """(loader, encoder, latents, world); encoder and world are None where the source has none."""
    if cfg.name == "shapes":
        return build_shapes_data(cfg, cache_dir, batch_size, rank, world_size, device)
    if cfg.name == "synthetic":
        latents = SyntheticLatents()
        loader = SyntheticLoader(cfg, latents, text_dim, batch_size, rank, world_size, device)
        return ShapesData(loader, None, latents, None)
    raise ValueError(f"data.name={cfg.name!r} is not one of ['shapes', 'synthetic']")
