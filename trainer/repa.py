"""iREPA: aligning one DiT block's image tokens with a frozen vision encoder's patch features.

REPA (Yu et al., 2024) speeds up diffusion-transformer training by asking an early
block's hidden states, through a small projector, to predict the clean image's
self-supervised features (DINOv2/v3) patch by patch. iREPA ("What matters for
representation alignment", Singh et al., 2025) found that what transfers is the
*spatial structure* of the target, not its global semantics, and changed two
things, both here:

- the projector is convolutional (3x3 convs over the token grid) instead of a
  per-token MLP, so it keeps and uses the spatial neighbourhood;
- targets are normalised over space, per sample and channel, which removes the
  component shared by all patches (the global, CLS-like part) and leaves contrast:

      y[b, n, c] = (x[b, n, c] - mean_n x[b, :, c]) / sqrt(var_n x[b, :, c] + eps)

  (population variance over the N patches of one image).

The loss is the negative cosine similarity per patch, averaged:
`align = -mean_{b,n} cos(proj(h)[b, n], y[b, n])`, in [-1, 1]; -1 is perfect.
The objective adds `weight * align` to the flow loss until `stop_step`, after
which REPA is off entirely (no projector forward, no gradient): alignment helps
early training and is known to get in the way later.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-6


@dataclass
class RepaConfig:
    # Weight of the alignment term (REPA's lambda); 0 switches REPA off.
    weight: float = 0.5
    # Index (0-based) of the DiT block whose output is aligned; REPA's ablations put the best
    # depth at about a third of the network (block 8 of 24).
    block: int = 8
    # First optimizer step without the alignment term; None keeps it for the whole stage.
    stop_step: int | None = None
    # Channels of the projector's hidden conv layer.
    hidden: int = 1024
    # Width Dv of the stored target features (DINOv3 ViT-S 384, ViT-B 768, ViT-L 1024).
    target_dim: int = 768


def validate_repa(cfg: RepaConfig, num_blocks: int) -> None:
    if not 0 <= cfg.block < num_blocks:
        raise ValueError(f"stage.repa.block={cfg.block} must index one of the model's {num_blocks} blocks")
    if cfg.weight < 0:
        raise ValueError(f"stage.repa.weight must be >= 0, got {cfg.weight}")
    if cfg.stop_step is not None and cfg.stop_step < 0:
        raise ValueError(f"stage.repa.stop_step must be >= 0 or null, got {cfg.stop_step}")
    if cfg.hidden < 1 or cfg.target_dim < 1:
        raise ValueError(f"stage.repa.hidden and target_dim must be positive, got {cfg.hidden}, {cfg.target_dim}")


def spatial_normalize(feats_BND: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """iREPA's target normalisation: per sample and channel, zero mean and unit std over the N patches."""
    x = feats_BND.float()
    mean_B1D = x.mean(dim=1, keepdim=True)
    var_B1D = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean_B1D) / torch.sqrt(var_B1D + eps)


def target_grid(num_patches: int, h: int, w: int) -> tuple[int, int]:
    """The (gh, gw) patch grid of N target features for an h x w token grid.

    Shards store the grid in each sample's json, but a batch only carries (B, N, Dv);
    the vision encoder keeps the image's aspect ratio, so the grid is the factorisation
    gh * gw = N whose aspect ratio is closest to the token grid's.
    """
    if num_patches < 1:
        raise ValueError(f"no target patches to align with (N = {num_patches})")
    ratio = math.log(h / w)
    gh = min((d for d in range(1, num_patches + 1) if num_patches % d == 0),
             key=lambda d: abs(math.log(d * d / num_patches) - ratio))
    gw = num_patches // gh
    if abs(math.log(gh / gw) - ratio) > 0.25:  # e.g. a prime N for a square grid
        raise ValueError(f"cannot lay {num_patches} target patches on a grid shaped like the {h}x{w} token grid")
    return gh, gw


class RepaProjector(nn.Module):
    """Image tokens (B, L, D) on an h x w grid -> predicted features (B, gh*gw, Dv).

    conv 3x3 -> SiLU -> conv 3x3 over the token grid, then resized to the target grid
    (area averaging when shrinking, bilinear when growing).
    """

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, out_dim, kernel_size=3, padding=1)

    def forward(self, hidden_BLD: torch.Tensor, grid_hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
        B, L, D = hidden_BLD.shape
        h, w = grid_hw
        if h * w != L:
            raise ValueError(f"{L} image tokens do not form a {h}x{w} grid")
        x_BDhw = hidden_BLD.transpose(1, 2).reshape(B, D, h, w)
        y_BVhw = self.conv2(F.silu(self.conv1(x_BDhw)))
        if (h, w) != tuple(target_hw):
            shrinking = target_hw[0] <= h and target_hw[1] <= w
            mode = "area" if shrinking else "bilinear"
            y_BVhw = F.interpolate(y_BVhw, size=tuple(target_hw), mode=mode,
                                   **({} if shrinking else {"align_corners": False}))
        return y_BVhw.flatten(2).transpose(1, 2)


def alignment_loss(pred_BND: torch.Tensor, target_BND: torch.Tensor) -> torch.Tensor:
    """-mean cosine similarity per patch between predictions and spatially normalised targets (fp32)."""
    if pred_BND.shape != target_BND.shape:
        raise ValueError(f"projector output {tuple(pred_BND.shape)} vs targets {tuple(target_BND.shape)}")
    cos_BN = F.cosine_similarity(pred_BND.float(), spatial_normalize(target_BND), dim=-1)
    return -cos_BN.mean()


def build_projector(cfg: RepaConfig, dim: int, seed: int) -> RepaProjector:
    """A seeded projector (the same on every rank, whatever the global RNG did before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RepaProjector(dim, cfg.hidden, cfg.target_dim)
