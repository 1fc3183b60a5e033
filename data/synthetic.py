"""Random latents and text features of any size, made on the device.

For measuring the trainer at full scale without a dataset: the tensors have
the shapes and masks of real 1024² batches (a Qwen-Image latent grid, 12 tapped
Qwen3-VL layers, a padded 512-token prompt), so the step costs what a real one
costs. Like the shapes loader, a batch is a pure function of the global sample
ids, and the only state is how many samples were consumed.
"""

from dataclasses import dataclass

import torch

from data.batch import Batch
from data.config import DataConfig


@dataclass
class SyntheticLatents:
    """Identity latent space of `channels` channels; `downsample` maps image pixels to latent pixels."""

    channels: int = 16
    downsample: int = 8

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3]


class SyntheticLoader:
    def __init__(self, cfg: DataConfig, latents: SyntheticLatents, text_dim: int, batch_size: int, rank: int,
                 world_size: int, device: torch.device):
        self.cfg, self.latents, self.text_dim = cfg, latents, text_dim
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, device
        self.micro_step = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        B, T, K = self.batch_size, self.cfg.text_len, len(self.cfg.text_layers)
        side = self.cfg.image_size // self.latents.downsample
        start = (self.micro_step * self.world_size + self.rank) * B
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + start)
        latents = torch.randn(B, self.latents.channels, side, side, generator=g, device=self.device)
        text = torch.randn(B, T, K, self.text_dim, generator=g, device=self.device)
        mask = torch.arange(T, device=self.device) < max(1, int(T * self.cfg.synthetic_valid_text))
        mask = mask.expand(B, T).clone()
        text = text * mask[..., None, None]
        self.micro_step += 1
        ids = torch.arange(start, start + B, dtype=torch.int64)
        return Batch(latents=latents, text=text, text_mask=mask, sample_ids=ids, captions=[""] * B)

    def state_dict(self) -> dict[str, int]:
        return {"samples_seen": self.micro_step * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.micro_step = int(state["samples_seen"]) // (self.batch_size * self.world_size)
