"""distill/tdm.py's losses on a 2-D Gaussian mixture whose teacher is exact: an 8-step
student distilled by TDM samples the teacher's distribution, which the teacher's own
8-step sampler does not."""

import math

import torch
import torch.nn as nn

from distill.config import TDMConfig
from distill.tdm import TDMLoss, eps_of, importance_weight, renoise, x0_of
from trainer.flow import euler_sample, sampling_times

# Two classes ("prompts"), each a mixture of two narrow isotropic Gaussians in 2-D.
MEANS = torch.tensor([[-1.5, -1.0], [-1.5, 1.0], [1.5, -1.0], [1.5, 1.0]], dtype=torch.float64)
CLASS_OF = torch.tensor([0, 0, 1, 1])
STD = 0.05


def mixture_velocity(x, t, cls):
    """E[eps - x0 | x_t = x] for the data distribution of class `cls` (None: both classes).
    x (B, 2) float64, t (B,), cls (B,) long or None."""
    t = t.to(torch.float64)[:, None, None]  # (B, 1, 1) against components (B, K, 2)
    var = (1 - t) ** 2 * STD**2 + t**2
    centred = x.to(torch.float64)[:, None, :] - (1 - t) * MEANS
    log_joint = -0.5 * (centred**2).sum(-1) / var[..., 0] - torch.log(var[..., 0])  # 2-D: log(2 pi var) / 2 x 2
    if cls is not None:
        log_joint = log_joint.masked_fill(CLASS_OF[None, :] != cls[:, None], -math.inf)
    velocity = (t - (1 - t) * STD**2) / var * centred - MEANS  # given the component
    return (log_joint.softmax(-1)[..., None] * velocity).sum(1)


def sample_mixture(cls, generator):
    k = CLASS_OF.new_tensor([0, 2])[cls] + torch.randint(0, 2, cls.shape, generator=generator)
    return MEANS[k] + STD * torch.randn(len(cls), 2, generator=generator, dtype=torch.float64)


def sliced_w1(a, b, directions=64):
    """Sliced Wasserstein-1 between two equal-size 2-D samples: the mean over fixed directions
    of the 1-D W1 of the projections."""
    ang = torch.arange(directions, dtype=torch.float64) * math.pi / directions
    d = torch.stack([ang.cos(), ang.sin()], 1)
    pa, pb = (a.double() @ d.T).sort(0).values, (b.double() @ d.T).sort(0).values
    return (pa - pb).abs().mean().item()


class MLP(nn.Module):
    """v(x, t, class): a small network standing for a DiT (class 2 = no prompt)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 32)
        self.net = nn.Sequential(nn.Linear(2 + 16 + 32, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))

    def forward(self, x, t, cls):
        freqs = torch.exp(torch.arange(8) * -0.9)
        tf = torch.cat([torch.sin(t[:, None] * 30 * freqs), torch.cos(t[:, None] * 30 * freqs)], 1)
        return self.net(torch.cat([x, tf, self.embed(cls)], 1))


def as_velocity(model, cls):
    """The (x, t_B, conditional) callable of trainer/flow.py for a batch of classes."""
    def velocity(x, t_B, conditional=True):
        return model(x.float(), t_B.float(), cls if conditional else torch.full_like(cls, 2)).to(x.dtype)
    return velocity


def teacher_velocity(cls):
    def velocity(x, t_B, conditional=True):
        return mixture_velocity(x, t_B, cls if conditional else None).to(x.dtype)
    return velocity


def test_renoise_keeps_the_flow_path_and_the_noise_level():
    g = torch.Generator().manual_seed(0)
    x0, eps, xi = (torch.randn(4096, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t_mid = torch.full((4096,), 0.3, dtype=torch.float64)
    t = torch.full((4096,), 0.7, dtype=torch.float64)
    x_t, eps_mix = renoise(x0, eps, t_mid, t, xi)
    # On the flow path with x0 and a noise of unit variance: what the fake score is trained on
    torch.testing.assert_close(x_t, 0.3 * x0 + 0.7 * eps_mix, rtol=0, atol=1e-12)
    assert abs(eps_mix.var().item() - 1) < 0.05
    # eps_mix is a standard normal when eps_hat is: the importance weight averages to about 1
    assert abs(importance_weight(eps_mix, xi).mean().item() - 1) < 0.05
    # x0 and eps predictions of a velocity invert the path exactly
    v = eps - x0
    x = interp = 0.4 * x0 + 0.6 * eps
    torch.testing.assert_close(x0_of(x, v, torch.full((4096,), 0.6, dtype=torch.float64)), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_of(interp, v, torch.full((4096,), 0.6, dtype=torch.float64)), eps, rtol=0,
                               atol=1e-12)


def test_tdm_student_matches_the_exact_teacher_in_8_steps():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n_eval = 4000
    cls_eval = torch.arange(n_eval) % 2
    noise_eval = torch.randn(n_eval, 2, generator=g)
    target = sample_mixture(cls_eval, g)
    # Turbo's pinned shift: the last of the 8 steps starts at t = 0.31, where the exact
    # teacher's Euler step lands on a blurred posterior mean.
    K, mu = 8, 1.15
    times = sampling_times(K, 1, mu)

    def k_step(velocity, k=K):
        return euler_sample(velocity, noise_eval.double(), 1, k, guidance=0.0, mu=mu)

    # The teacher's own 8-step Euler sampler is far off; its 256-step one is the distribution.
    w_teacher8 = sliced_w1(k_step(teacher_velocity(cls_eval)), target)
    w_teacher256 = sliced_w1(k_step(teacher_velocity(cls_eval), 256), target)

    # The student starts as the teacher's flow-matching fit (a DiT's pretraining, in small).
    student = MLP()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    for _ in range(1500):
        cls = torch.randint(0, 2, (256,), generator=g)
        x0 = sample_mixture(cls, g).float()
        eps = torch.randn(256, 2, generator=g)
        t = torch.rand(256, generator=g)
        drop = torch.rand(256, generator=g) < 0.1
        v = student((1 - t[:, None]) * x0 + t[:, None] * eps, t, torch.where(drop, 2, cls))
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fake = MLP()
    fake.load_state_dict(student.state_dict())
    with torch.no_grad():
        w_before = sliced_w1(k_step(as_velocity(student, cls_eval)), target)

    cfg = TDMConfig(segments=K, mu=mu, guidance=0.0, random_mid=False, within_segment=True)
    tdm = TDMLoss(cfg, times)
    opt_s = torch.optim.Adam(student.parameters(), lr=1e-4, betas=(0.0, 0.95))
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.95))
    fake_losses = []
    for it in range(600):
        cls = torch.randint(0, 2, (256,), generator=g)
        noise = torch.randn(256, 2, generator=g)
        states, vels = tdm.rollout(as_velocity(student, cls), noise, K - 1)
        dr = tdm.draws((256, 2), g, "cpu")
        loss_f, _ = tdm.fake_loss(as_velocity(fake, cls), tdm.pick(states, dr.k), tdm.pick(vels, dr.k), dr)
        opt_f.zero_grad()
        loss_f.backward()
        opt_f.step()
        fake_losses.append(loss_f.item())
        dr = tdm.draws((256, 2), g, "cpu")
        loss_s, _ = tdm.student_loss(as_velocity(student, cls), teacher_velocity(cls), as_velocity(fake, cls),
                                     tdm.pick(states, dr.k), dr)
        opt_s.zero_grad()
        loss_s.backward()
        opt_s.step()
    with torch.no_grad():
        w_after = sliced_w1(k_step(as_velocity(student, cls_eval)), target)
    print(f"sliced W1: teacher 8 steps {w_teacher8:.4f}, 256 steps {w_teacher256:.4f}; "
          f"student 8 steps before {w_before:.4f}, after TDM {w_after:.4f}; "
          f"fake loss max {max(fake_losses):.4f} last {fake_losses[-1]:.4f}")
    # 4000 samples of the distribution itself (the 256-step exact teacher) sit at about 0.024.
    assert w_teacher256 < 0.03
    assert w_after < 0.7 * w_before, "TDM did not move the student's 8-step samples towards the teacher's"
    assert w_after < w_teacher8, "the 8-step student should beat the teacher's own 8-step sampler"
    assert all(math.isfinite(v) for v in fake_losses) and max(fake_losses) < 0.5, "fake-score loss not bounded"
