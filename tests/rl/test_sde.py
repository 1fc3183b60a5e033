"""rl/sde.py: the SDE sampler keeps the flow's marginals, scores its own steps, and is reproducible."""

import math

import pytest
import torch
from torch.distributions import Normal

from rl.sde import sde_rollout, sde_step, step_log_prob
from trainer.flow import euler_sample, sampling_times

# ---- a 1-D Gaussian mixture whose flow-matching velocity is known in closed form ------------------
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-2.0, 1.5], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.6], dtype=torch.float64)


def _components(x, t):
    """log(w_k N(x; (1 - t) m_k, var_k)) and E[eps - x0 | x_t = x, k], each (..., K)."""
    x, t = x[..., None], t[..., None]
    var = (1 - t) ** 2 * STDS**2 + t**2
    centred = x - (1 - t) * MEANS
    log_joint = torch.log(WEIGHTS) - 0.5 * centred**2 / var - 0.5 * torch.log(2 * math.pi * var)
    # Given k, x0, eps and x_t are jointly Gaussian: E[x0 | x_t, k] = m_k + (1 - t) s_k^2 / var * centred
    # and E[eps | x_t, k] = t / var * centred.
    velocity = (t - (1 - t) * STDS**2) / var * centred - MEANS
    return log_joint, velocity


def mixture_density(x, t):
    return _components(x, t)[0].logsumexp(-1).exp()


def mixture_velocity(x, t):
    """E[eps - x0 | x_t = x]: the components' velocities weighted by the posterior over components."""
    log_joint, velocity = _components(x, t)
    return (log_joint.softmax(-1) * velocity).sum(-1)


def mixture_model(x_B1, t_B, conditional):
    return mixture_velocity(x_B1, t_B.to(x_B1.dtype)[:, None])


def mixture_quantiles(n: int) -> torch.Tensor:
    """The exact quantiles at (i + 1/2) / n, by bisection on the mixture's CDF."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    lo, hi = torch.full_like(u, -10.0), torch.full_like(u, 10.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = (WEIGHTS * torch.special.ndtr((mid[:, None] - MEANS) / STDS)).sum(-1) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def w1(samples: torch.Tensor, quantiles: torch.Tensor) -> float:
    """1-D Wasserstein-1 distance between the samples and the distribution with these quantiles."""
    return (samples.flatten().double().sort().values - quantiles).abs().mean().item()


def test_mixture_velocity_solves_the_continuity_equation():
    # In 1-D, dp/dt + d(p v)/dx = 0 together with p v -> 0 in the tails fixes v. Checking it by
    # finite differences checks the closed form without using its derivation.
    x = torch.linspace(-6, 6, 4801, dtype=torch.float64)
    dx, h = (x[1] - x[0]).item(), 1e-5
    for t in (0.05, 0.3, 0.6, 0.95):
        t_x = torch.full_like(x, t)
        dp_dt = (mixture_density(x, t_x + h) - mixture_density(x, t_x - h)) / (2 * h)
        flux = mixture_density(x, t_x) * mixture_velocity(x, t_x)
        residual = dp_dt[1:-1] + (flux[2:] - flux[:-2]) / (2 * dx)
        assert residual.abs().max() < 1e-4 * dp_dt.abs().max(), t
        assert flux[0].abs() < 1e-6 and flux[-1].abs() < 1e-6, t


def test_ode_and_sde_samples_converge_to_the_mixture():
    # The noise is the standard normal's quantiles, not draws: the 1-D ODE map is monotone, so
    # the ODE's W1 measures its discretization error alone. The SDE keeps a sampling floor of
    # about 0.01 at n = 20k, mostly from the binomial split of mass between the two modes.
    n = 20_000
    noise = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    exact = mixture_quantiles(n)
    ode, sde = [], []
    for steps in (10, 20, 80):
        ode.append(w1(euler_sample(mixture_model, noise, 256, steps, guidance=0.0), exact))
        traj = sde_rollout(mixture_model, noise, 256, steps, guidance=0.0, noise_level=0.7,
                           generator=torch.Generator().manual_seed(1))
        sde.append(w1(traj.states[:, -1], exact))
    # Measured: ODE 0.120, 0.061, 0.015 and SDE 0.073, 0.029, 0.006. Over generator seeds 1-4
    # the SDE at 80 steps gives 0.006-0.016. At 80 steps, a drift with the score term's sign
    # flipped gives 2.8 (and grows with the step count), no score term 0.66, a score term scaled
    # by 2 or 0.5 gives 0.31 or 0.25, a std scaled by 0.8 gives 0.19, and sigma capped at
    # t = 1 - 1e-3, instead of taken at s on the first step, gives 0.11.
    assert ode[0] > ode[1] > ode[2] and sde[0] > sde[1] > sde[2], (ode, sde)
    assert ode[2] < 0.03 and sde[2] < 0.03, (ode, sde)


# ---- a small nonlinear "model" on (B, C, H, W) latents, with a conditional/unconditional split ----
def toy_velocity(x, t_B, conditional):
    t = t_B.view(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x.roll(1, -1) + (0.5 if conditional else -0.5)) * (1 + t) - t * x


def guided(x, t_B, guidance):
    c = toy_velocity(x, t_B, True)
    return c + guidance * (c - toy_velocity(x, t_B, False))


def test_noise_level_zero_is_the_euler_sampler():
    noise = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    for guidance in (0.0, 3.0):
        reference = euler_sample(toy_velocity, noise, 1024, num_steps=7, guidance=guidance, mu=1.15)
        traj = sde_rollout(toy_velocity, noise, 1024, 7, guidance=guidance, mu=1.15, noise_level=0.0,
                           generator=torch.Generator().manual_seed(3))
        assert torch.equal(traj.states[:, 0], noise) and torch.equal(traj.states[:, -1], reference)
        assert torch.equal(traj.times, sampling_times(7, 1024, 1.15))
        assert not traj.sde_mask.any() and traj.log_probs.isnan().all()


def test_step_log_prob_recomputes_the_rollout_and_matches_an_independent_normal():
    B, a, g = 64, 0.7, 2.0
    noise = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    traj = sde_rollout(toy_velocity, noise, 256, 6, guidance=g, noise_level=a, generator=torch.Generator().manual_seed(5))
    assert traj.sde_mask.tolist() == [True] * 5 + [False]
    assert traj.log_probs[:, :5].isfinite().all() and traj.log_probs[:, 5].isnan().all()
    for j in range(5):
        x, x_next, t, s = traj.states[:, j], traj.states[:, j + 1], traj.times[j], traj.times[j + 1]
        v = guided(x, t.expand(B), g)
        log_p = step_log_prob(v, x, x_next, t, s, a)
        assert torch.equal(log_p, traj.log_probs[:, j]), j
        assert torch.equal(step_log_prob(v, x, x_next, t.expand(B), s.expand(B), a), log_p), j
        # Independently, in float64: sigma at t, or at s on the step from t = 1.
        t64, s64 = t.item(), s.item()
        t_sigma = s64 if t64 == 1 else t64
        sigma = a * math.sqrt(t_sigma / (1 - t_sigma))
        x64, v64 = x.double(), v.double()
        mean = x64 + (s64 - t64) * (v64 + sigma**2 / (2 * t64) * (x64 + (1 - t64) * v64))
        std = sigma * math.sqrt(t64 - s64)
        expected = Normal(mean, std).log_prob(x_next.double()).flatten(1).mean(1)
        torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-5)
        # x_next was drawn from that Gaussian: the standardized residuals (2048 of them) are N(0, 1).
        z = (x_next.double() - mean) / std
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1, j
        # The step is less likely under any other velocity (Gibbs' inequality, on average).
        assert step_log_prob(v + 2.0, x, x_next, t, s, a).mean() < log_p.mean(), j


def test_rollout_is_reproducible_and_sde_steps_pick_the_noisy_steps():
    B, g = 8, 1.5
    noise = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(6))

    def rollout(seed, sde_steps=None):
        return sde_rollout(toy_velocity, noise, 256, 8, guidance=g, noise_level=0.7, sde_steps=sde_steps,
                           generator=torch.Generator().manual_seed(seed))

    first, again = rollout(7), rollout(7)
    assert torch.equal(first.states, again.states)
    torch.testing.assert_close(first.log_probs, again.log_probs, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(rollout(8).states[:, -1], first.states[:, -1])

    window = (2, 3, 4)
    traj = rollout(7, sde_steps=range(2, 5))
    assert traj.sde_mask.tolist() == [j in window for j in range(8)]
    # Step j's noise is the generator's j-th draw whichever steps are SDE steps, so a window
    # that slides keeps the noise of the steps it shares with another.
    draws = torch.Generator().manual_seed(7)
    for j in range(8):
        x, t, s = traj.states[:, j], traj.times[j], traj.times[j + 1]
        v = guided(x, t.expand(B), g)
        eps = torch.randn(x.shape, generator=draws)
        assert torch.equal(traj.states[:, j + 1], x + (s - t) * v) == (j not in window), j
        if j in window:
            mean, std = sde_step(v, x, t, s, 0.7)
            assert torch.equal(traj.states[:, j + 1], mean + std * eps), j
        assert traj.log_probs[:, j].isfinite().all() if j in window else traj.log_probs[:, j].isnan().all(), j
    with pytest.raises(ValueError, match="last step"):
        rollout(7, sde_steps=[7])
