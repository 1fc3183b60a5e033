"""The SDE form of the flow sampler (Flow-GRPO): stochastic steps with the ODE's marginals,
and the Gaussian log-probability of each step, which is what GRPO's policy ratio needs.

Convention of trainer/flow.py: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps and
the model predicts v = eps - x0. Because x = (1 - t) x0_hat + t eps_hat and v = eps_hat - x0_hat
for the posterior means, E[eps | x_t = x] = x + (1 - t) v, so the score is

    grad log p_t(x) = -E[eps | x_t = x] / t = -(x + (1 - t) v) / t.

The probability-flow ODE dx/dt = v runs from t = 1 to t = 0. Adding the drift
-(sigma_t^2 / 2) grad log p_t to it and noise sigma_t dW (Brownian in the direction of
decreasing t) leaves every marginal p_t as it was: in the Fokker-Planck equation the extra
drift cancels the diffusion term. Substituting the score, the reverse-time SDE is

    dx = [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] dt + sigma_t dW,   sigma_t = a sqrt(t / (1 - t)),

with a = `noise_level` (0.7 in Flow-GRPO). One Euler-Maruyama step from t to s < t, with
dt = s - t < 0, draws x_s ~ N(mean, std^2) elementwise:

    mean = x + dt * [v + sigma_t^2 / (2 t) * (x + (1 - t) v)]      std = sigma_t * sqrt(t - s).

With a = 0 this is the Euler step of trainer/flow.euler_sample, to the bit. Two places need
care. At t = 1, sigma_t is infinite: the step that starts there takes sigma at its end time s
instead (as Flow-GRPO does). A fixed cap such as t <= 1 - 1e-3 would give sigma^2 ~ 490 and wreck
the first step of a coarse schedule, while sigma_s keeps sigma^2 (t - s) bounded. The step to
t = 0 is always an ODE step: an SDE step there would leave noise of std sigma_t sqrt(t) in the
sample, and no later step would remove it.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from trainer.flow import sampling_times

Velocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A time in float32 (the dtype of `sampling_times`): a scalar, or (B,) shaped to broadcast over x."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.view(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t


def sde_sigma(t: torch.Tensor, s: torch.Tensor, noise_level: float) -> torch.Tensor:
    """sigma_t = a sqrt(t / (1 - t)), taken at s on the step that starts at t = 1 (module docstring)."""
    t_sigma = torch.where(t < 1, t, s)
    return noise_level * torch.sqrt(t_sigma / (1 - t_sigma))


def sde_step(v: torch.Tensor, x: torch.Tensor, t, s, noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of x_s given x_t = x and the velocity v there: one Euler-Maruyama step from t to s < t.

    t and s are floats, 0-d tensors or (B,) tensors (pass the recorded `times` to match a rollout
    to the bit). The mean is computed in float32, or float64 for float64 inputs. std is float32,
    a 0-d tensor or (B, 1, ...). noise_level = 0 gives the Euler step x + (s - t) v, with std 0.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(dtype), v.to(dtype)
    t, s = _time(t, x), _time(s, x)
    sigma = sde_sigma(t, s, noise_level)
    drift = v + sigma**2 / (2 * t) * (x + (1 - t) * v)
    return x + (s - t) * drift, sigma * torch.sqrt(t - s)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per sample, averaged over the elements of each sample, in float64: (B,).

    The average over elements rather than the sum follows Flow-GRPO. It keeps the scale of a
    log-ratio, and so the PPO clip range, independent of the latent size. float64 because
    GRPO's ratio is exp of a small difference of two of these.
    """
    x, mean, std = x.double(), mean.double(), std.double()
    log_p = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - _LOG_SQRT_2PI
    return log_p.reshape(x.shape[0], -1).mean(1)


def step_log_prob(velocity_at_x_t: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor, t, s,
                  noise_level: float) -> torch.Tensor:
    """log p(x_next | x_t) of a recorded SDE step under a fresh velocity prediction at (x_t, t): (B,) float64.

    The rollout scores its own steps with this function. Called with the rollout's velocity, it
    therefore returns the rollout's log-probs exactly. GRPO calls it with the policy's new velocity.
    """
    mean, std = sde_step(velocity_at_x_t, x_t, t, s, noise_level)
    return gaussian_log_prob(x_next, mean, std)


def guided_velocity(velocity: Velocity, x: torch.Tensor, t_B: torch.Tensor, guidance: float) -> torch.Tensor:
    """Krea-style guidance v = c + g (c - u), as in trainer/flow.euler_sample; g = 0 costs one call."""
    v = velocity(x, t_B, True)
    if guidance != 0:
        v = v + guidance * (v - velocity(x, t_B, False))
    return v


@dataclass
class Trajectory:
    """One rollout of N steps. Step j goes from times[j] to times[j + 1]."""

    states: torch.Tensor  # (B, N + 1, ...): x_0 .. x_N. states[:, 0] is the noise and states[:, -1] the sample
    times: torch.Tensor  # (N + 1,) float32, descending from 1 to 0 (trainer.flow.sampling_times)
    log_probs: torch.Tensor  # (B, N) float64: log p(states[:, j + 1] | states[:, j]); NaN at ODE steps
    sde_mask: torch.Tensor  # (N,) bool: True where step j was an SDE step

    log_prob_of = staticmethod(gaussian_log_prob)  # the convention the log_probs were computed with


def _sde_mask(num_steps: int, sde_steps: Iterable[int] | None, noise_level: float) -> list[bool]:
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    steps = range(num_steps - 1) if sde_steps is None else sorted(set(sde_steps))
    if any(not 0 <= j < num_steps - 1 for j in steps):
        raise ValueError(f"sde_steps must lie in [0, {num_steps - 1}) for {num_steps} steps: the last step, "
                         f"to t = 0, is always an ODE step; got {list(steps)}")
    # noise_level 0 has no density to score: every step is then an ODE step.
    return [noise_level > 0 and j in steps for j in range(num_steps)]


@torch.no_grad()
def sde_rollout(velocity: Velocity, noise: torch.Tensor, image_tokens: int, num_steps: int, *,
                guidance: float, mu: float | None = None, noise_level: float = 0.7,
                sde_steps: Iterable[int] | None = None,
                generator: torch.Generator | None = None) -> Trajectory:
    """Samples from noise (t = 1) to data (t = 0) on the schedule of euler_sample, recording every state.

    `velocity(x, t_B, conditional)` is the model, as in trainer/flow.euler_sample, and guidance
    works as it does there. Steps whose index is in `sde_steps` are SDE steps (module docstring).
    None means every step but the last; MixGRPO passes a sliding window such as range(i, i + w).
    All other steps are Euler (ODE) steps. Step noise comes from `generator`, or from the global
    RNG when generator is None. It is drawn on the generator's device, so a CPU generator gives
    the same noise whatever device the latents are on. One draw is made per step, whether or not
    the step uses it, so step j's noise does not depend on which steps are SDE steps.
    """
    times = sampling_times(num_steps, image_tokens, mu).to(noise.device)
    is_sde = _sde_mask(num_steps, sde_steps, noise_level)
    B = noise.shape[0]
    noise_device = generator.device if generator is not None else noise.device
    log_probs = torch.full((B, num_steps), math.nan, dtype=torch.float64, device=noise.device)
    x, states = noise, [noise]
    for j in range(num_steps):
        t, s = times[j], times[j + 1]
        v = guided_velocity(velocity, x, t.expand(B), guidance)
        eps = torch.randn(x.shape, generator=generator, device=noise_device, dtype=torch.float32).to(x.device)
        if is_sde[j]:
            mean, std = sde_step(v, x, t, s, noise_level)
            x_next = (mean + std * eps).to(x.dtype)
            # Scored after the cast: the log-prob is the stored state's, as a recomputation sees it.
            log_probs[:, j] = step_log_prob(v, x, x_next, t, s, noise_level)
        else:
            x_next = sde_step(v, x, t, s, 0.0)[0].to(x.dtype)
        states.append(x_next)
        x = x_next
    return Trajectory(torch.stack(states, 1), times, log_probs, torch.tensor(is_sde, device=noise.device))
