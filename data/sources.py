"""One entry point from a DataConfig to what the trainer consumes."""

import os

import torch

from data.config import DataConfig
from data.latents import make_latents
from data.shapes import ShapesWorld
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
        return build_shard_data(cfg, batch_size, rank, world_size, device, weighted=True)
    raise ValueError(f"data.name={cfg.name!r} is not one of ['shapes', 'shards', 'synthetic']")


def build_shard_data(cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                     device: torch.device, weighted: bool = False) -> ShapesData:
    """Shards written by data/writer.py. `latents` is what the index says the shards hold
    (channels, downsample); the encoder (for sample grids only) is loaded when
    cfg.encoder_path is set, tapping the layers the shards were written with. `weighted`
    (training): the loader draws by cfg.weights; sampling and evaluation read the index only."""
    if not cfg.path:
        raise ValueError("data.name=shards needs data.path: a shard directory with index.json (data/writer.py)")
    loader = ShardLoader(cfg.path, batch_size, rank, world_size, seed=cfg.seed, caption_dropout=cfg.caption_dropout,
                         text_len=cfg.text_len, num_workers=cfg.num_workers, prefetch=cfg.prefetch,
                         pin_memory=torch.device(device).type == "cuda", verify=cfg.verify,
                         max_abs_latent=cfg.max_abs_latent, weights=cfg.weights if weighted else None,
                         epoch_size=cfg.epoch_size if weighted else None)
    encoder = None
    if cfg.encoder_path:
        if not os.path.isdir(cfg.encoder_path):
            raise ValueError(f"data.encoder_path={cfg.encoder_path!r} is not a folder (a Qwen3-VL checkpoint)")
        layers = loader.index.meta["text"]["layers"]
        encoder = TextEncoder.from_pretrained(cfg.encoder_path, layers=layers, max_len=cfg.text_len, device=device)
    world = ShapesWorld(image_size=cfg.image_size, seed=cfg.seed) if cfg.world == "shapes" else None
    return ShapesData(loader, encoder, shard_latents(cfg, loader.latents, device), world)


def shard_latents(cfg: DataConfig, info, device: torch.device):
    """The shards' latent space with a decoder where one is at hand (pixels always, a VAE
    with data.vae_path); otherwise the index's description alone (no sample grids)."""
    if info.kind == "pixels":
        return make_latents("pixels", pixel_downsample=info.downsample)
    if cfg.vae_path:
        latents = make_latents(info.kind, cfg.vae_path, device=device)
        if latents.channels != info.channels:
            raise ValueError(f"data.vae_path={cfg.vae_path!r} has {latents.channels} latent channels, the shards "
                             f"{info.channels}")
        return latents
    return info
