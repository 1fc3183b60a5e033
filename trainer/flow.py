"""Rectified flow: the path, the target, timestep sampling, the loss and the Euler sampler.

Convention (Krea 2, FLUX, SD3): t = 0 is data, t = 1 is noise.

    x_t = (1 - t) * x0 + t * eps          target v = eps - x0

so integrating dx/dt = v from t = 1 down to t = 0 turns noise into an image.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Resolution-dependent shift: mu grows linearly with the number of image tokens,
# from 0.5 at 256 px (256 tokens with an f8 VAE and patch 2) to 1.15 at 1280 px
# (6400 tokens). Larger images keep more signal at a given t, so the schedule
# spends more time at high noise.
BASE_TOKENS, MAX_TOKENS = 256, 6400
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def shift_mu(image_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (image_tokens - BASE_TOKENS)


def shift_time(t: torch.Tensor, mu: float) -> torch.Tensor:
    """t' = e^mu / (e^mu + (1/t - 1)); maps 0 -> 0 and 1 -> 1, pushes mass towards noise for mu > 0."""
    e = math.exp(mu)
    # Written as e*t / (e*t + 1 - t) so t = 0 needs no division by zero.
    return e * t / (e * t + (1 - t))


@dataclass
class FlowConfig:
    # Logit-normal timestep density (SD3): t = sigmoid(N(mean, std)), then shifted.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # None: mu from the batch's image-token count; a number pins it (e.g. 1.15 for Turbo).
    mu: float | None = None


def sample_timesteps(noise_B: torch.Tensor, image_tokens: int, cfg: FlowConfig) -> torch.Tensor:
    """Turns standard-normal draws (B,) into shifted logit-normal times in (0, 1).

    The caller supplies the normal draws so it controls the RNG (one stream per sample id).
    """
    t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * noise_B)
    mu = cfg.mu if cfg.mu is not None else shift_mu(image_tokens)
    return shift_time(t, mu)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    t = t_B.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the velocity target, averaged over every element (fp32)."""
    return (v_pred.float() - velocity_target(x0, eps).float()).pow(2).mean()


def sampling_times(num_steps: int, image_tokens: int, mu: float | None = None) -> torch.Tensor:
    """num_steps + 1 descending times from 1 to 0: linspace(1, 1/N), shifted, then a final 0."""
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    t = shift_time(t, shift_mu(image_tokens) if mu is None else mu)
    return torch.cat([t, t.new_zeros(1)]).float()


@torch.no_grad()
def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    noise: torch.Tensor,
    image_tokens: int,
    num_steps: int = 52,
    guidance: float = 3.5,
    mu: float | None = None,
) -> torch.Tensor:
    """Integrates from noise (t = 1) to data (t = 0).

    `velocity(x, t_B, conditional)` returns the model's velocity with (True) or
    without (False) the prompt. Krea-style guidance: v = c + g * (c - u), so
    g = 0 is plain conditional sampling (Turbo) and costs one call per step.
    """
    times = sampling_times(num_steps, image_tokens, mu).to(noise.device)
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t_B = t_cur.expand(x.shape[0])
        v = velocity(x, t_B, True)
        if guidance != 0:
            v = v + guidance * (v - velocity(x, t_B, False))
        x = x + (t_next - t_cur) * v
    return x
