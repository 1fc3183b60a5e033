"""The unit the trainer consumes: one micro-batch of latents with their text features."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, H, W) float, in the latent space's normalised units
    text: torch.Tensor  # (B, T, K, D) features from K encoder layers; zero where text_mask is False
    text_mask: torch.Tensor  # (B, T) bool, True on real prompt tokens
    sample_ids: torch.Tensor  # (B,) int64 global sample ids (for dedup checks and resume tests)
    captions: list[str]  # the prompts as fed to the encoder ("" where caption dropout hit)
    # (B, N, Dv) patch features of the clean images from a frozen vision encoder (iREPA
    # targets), row-major over the bucket's patch grid; None where the data has none.
    repa: torch.Tensor | None = None

    def __post_init__(self):
        batch = self.latents.shape[0]
        shapes = {"text": self.text.shape[0], "text_mask": self.text_mask.shape[0],
                  "sample_ids": self.sample_ids.shape[0], "captions": len(self.captions)}
        if self.repa is not None:
            shapes["repa"] = self.repa.shape[0]
        wrong = {k: v for k, v in shapes.items() if v != batch}
        if wrong:
            raise ValueError(f"batch of {batch} latents but leading sizes {wrong}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "Batch":
        """A copy on `device` (captions stay a Python list)."""
        return replace(
            self,
            latents=self.latents.to(device, non_blocking=non_blocking),
            text=self.text.to(device, non_blocking=non_blocking),
            text_mask=self.text_mask.to(device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device, non_blocking=non_blocking),
            repa=None if self.repa is None else self.repa.to(device, non_blocking=non_blocking),
        )
