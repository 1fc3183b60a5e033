"""One entry point from a DataConfig to what the trainer consumes."""

import torch

from data.config import DataConfig
from data.shapes_loader import ShapesData, build_shapes_data
from data.shard_loader import ShardLoader
from data.synthetic import SyntheticLatents, SyntheticLoader
from data.text import TextEncoder


def build_data(cfg: DataConfig, cache_dir: str, batch_size: int, rank: int, world_size: int,
               device: torch.device, text_dim: int) -> ShapesData:
    """(loader, encoder, latents, world); encoder and world are None where the source has none."""
    if cfg.name == "shapes":
        return build_shapes_data(cfg, cache_dir, batch_size, rank, world_size, device)
    if cfg.name == "synthetic":
        latents = SyntheticLatents()
        loader = SyntheticLoader(cfg, latents, text_dim, batch_size, rank, world_size, device)
        return ShapesData(loader, None, latents, None)
    if cfg.name == "shards":
        return build_shard_data(cfg, batch_size, rank, world_size, device)
    raise ValueError(f"data.name={cfg.name!r} is not one of ['shapes', 'shards', 'synthetic']")


def build_shard_data(cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                     device: torch.device) -> ShapesData:
    """Shards written by data/writer.py. `latents` is what the index says the shards hold
    (channels, downsample); the encoder (for sample grids only) is loaded when
    cfg.encoder_path is set, tapping the layers the shards were written with."""
    if not cfg.path:
        raise ValueError("data.name=shards needs data.path: a shard directory with index.json (data/writer.py)")
    loader = ShardLoader(cfg.path, batch_size, rank, world_size, seed=cfg.seed, caption_dropout=cfg.caption_dropout,
                         text_len=cfg.text_len, num_workers=cfg.num_workers, prefetch=cfg.prefetch,
                         pin_memory=torch.device(device).type == "cuda")
    encoder = None
    if cfg.encoder_path:
        layers = loader.index.meta["text"]["layers"]
        encoder = TextEncoder.from_pretrained(cfg.encoder_path, layers=layers, max_len=cfg.text_len, device=device)
    return ShapesData(loader, encoder, loader.latents, None)
