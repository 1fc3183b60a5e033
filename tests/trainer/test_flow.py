import math

import torch

from trainer.flow import (
    FlowConfig,
    euler_sample,
    flow_loss,
    interpolate,
    sample_timesteps,
    sampling_times,
    shift_mu,
    shift_time,
)


def test_shift_mu_follows_token_count():
    assert math.isclose(shift_mu(256), 0.5)  # 256 px
    assert math.isclose(shift_mu(6400), 1.15)  # 1280 px
    assert 0.5 < shift_mu(4096) < 1.15  # 1024 px sits in between


def test_shift_time_formula_and_fixed_points():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    mu = 1.15
    expected = math.exp(mu) / (math.exp(mu) + (1 / t[1:-1] - 1))
    torch.testing.assert_close(shift_time(t, mu)[1:-1], expected)
    assert shift_time(t, mu)[0] == 0 and shift_time(t, mu)[-1] == 1
    torch.testing.assert_close(shift_time(t, 0.0), t)  # mu = 0 is the identity
    assert (shift_time(t[1:-1], mu) > t[1:-1]).all()  # positive mu moves towards noise


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)
    # The exact velocity d x_t / dt is eps - x0; a model predicting it has zero loss.
    assert flow_loss(eps - x0, x0, eps) == 0
    assert flow_loss(torch.zeros_like(x0), x0, eps) > 0


def test_logit_normal_timesteps_median_is_shifted_half():
    u = torch.randn(200_001, generator=torch.Generator().manual_seed(0))
    t = sample_timesteps(u, image_tokens=256, cfg=FlowConfig())
    assert ((t > 0) & (t < 1)).all()
    assert abs(t.median().item() - shift_time(torch.tensor(0.5), 0.5).item()) < 5e-3
    pinned = sample_timesteps(u, image_tokens=256, cfg=FlowConfig(mu=1.15))
    assert abs(pinned.median().item() - shift_time(torch.tensor(0.5), 1.15).item()) < 5e-3


def test_sampling_times_schedule():
    times = sampling_times(8, image_tokens=4096, mu=1.15)
    assert times.shape == (9,) and times[0] == 1 and times[-1] == 0
    assert (times[1:] < times[:-1]).all()
    torch.testing.assert_close(times[1], shift_time(torch.tensor(7 / 8, dtype=torch.float64), 1.15).float())


def test_euler_with_exact_velocity_recovers_data():
    # For a single data point x0 the flow is straight: v(x, t) = (x - x0) / t,
    # and Euler is exact on straight paths whatever the step count.
    x0 = torch.randn(2, 16, 4)
    noise = torch.randn(2, 16, 4)
    out = euler_sample(lambda x, t, c: (x - x0) / t.view(-1, 1, 1), noise, 256, num_steps=5, guidance=0.0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_guidance_combines_conditional_and_unconditional():
    calls = []

    def velocity(x, t, conditional):
        calls.append(conditional)
        return torch.full_like(x, 2.0 if conditional else 1.0)

    noise = torch.zeros(1, 4, 2)
    out = euler_sample(velocity, noise, 256, num_steps=1, guidance=3.5)
    # One step from t=1 to t=0: x = noise - v with v = c + g (c - u) = 2 + 3.5.
    torch.testing.assert_close(out, torch.full_like(noise, -5.5))
    assert calls == [True, False]
    calls.clear()
    euler_sample(velocity, noise, 256, num_steps=3, guidance=0.0)
    assert calls == [True, True, True]  # Turbo: no unconditional pass
