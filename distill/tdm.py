"""Trajectory Distribution Matching (TDM, arXiv 2503.06674) in flow-matching form
(`stage.kind=tdm`): a few-step, guidance-free student distilled from a guided teacher.

Convention of trainer/flow.py: x_t = (1 - t) x0 + t eps, v = eps - x0, t = 1 is noise.
A velocity v at (x, t) names a clean prediction and a noise prediction:

    x0_hat = x - t v          eps_hat = x + (1 - t) v

Three models. The **teacher** (frozen) is the guided model being distilled. The
**student** (trained, full weights or a LoRA on the teacher) samples in K segments with
boundaries t_0 = 1 > t_1 > ... > t_K = 0 (`sampling_times(K, mu)`, mu pinned): one Euler
step per segment, so the student's own sampler is the flow sampler at K steps,
guidance 0. The **fake score** (trained, initialised from the teacher) learns the
distribution of the student's intermediate predictions.

One iteration (one optimizer step of the loop):

1. The student rolls out from noise (no grad), recording x_{t_k} and its velocity there.
2. Per sample a segment k is drawn. Its clean prediction x0_hat is moved along the
   student's own ODE to t_mid (the segment's end, or a point inside it), then
   forward-noised with fresh noise xi to a time t > t_mid:

       x_mid = (1 - t_mid) x0_hat + t_mid eps_hat
       x_t   = r x_mid + b xi,   r = (1 - t) / (1 - t_mid),   b^2 = t^2 - (r t_mid)^2

   so that x_t = (1 - t) x0_hat + t eps_mix with eps_mix = (r t_mid eps_hat + b xi) / t.
3. Fake-score update: its clean prediction at (x_t, t) regresses x0_hat, weighted by
   min(SNR_t, snr_cap) x the importance ratio exp(-|eps_mix|^2 / 2) / exp(-|xi|^2 / 2)
   (squared norms as per-element means, as TDM's code does).
4. Student update (fresh k, t_mid, t, xi): the teacher's guided clean prediction
   x0_T = x_t - t (c + g (c - u)) and the fake score's x0_F at the same x_t give the target

       target = x0_hat + (x0_T - x0_F)

   (guidance baked in: the student runs at guidance 0), and the loss is the pseudo-Huber
   distance sqrt((x0_hat - target)^2 + c^2) - c, divided per sample by mean|x0_hat - x0_T|.
   Only x0_hat carries a gradient.

The math is in functions of velocity callables (`TDMLoss`), so the same code trains DiTs
here and tiny MLPs against an exact teacher in tests. Every draw comes from (seed, step,
rank): a resumed run is the uninterrupted one. The teacher is never checkpointed; the
student ("model": weights, optimizer, EMA) and the fake score ("fake_score": weights,
optimizer) are.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from distill.config import TDMConfig
from trainer.config import TrainConfig
from trainer.flow import sampling_times
from trainer.model import patchify
from trainer.optim import lr_at, set_lr
from trainer.parallel import Dist
from trainer.prompted import PromptedStage
from trainer.stage import Trainable, autocast, build_dit, update

log = logging.getLogger("k2train")

# velocity(x, t_B, conditional) -> v, as trainer/flow.euler_sample takes it.
Velocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _bcast(t_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t_B.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def x0_of(x: torch.Tensor, v: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """The clean prediction x - t v of a velocity v at (x, t)."""
    return x - _bcast(t_B, x) * v


def eps_of(x: torch.Tensor, v: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """The noise prediction x + (1 - t) v of a velocity v at (x, t)."""
    return x + (1 - _bcast(t_B, x)) * v


def renoise(x0: torch.Tensor, eps_hat: torch.Tensor, t_mid: torch.Tensor, t: torch.Tensor,
            xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, eps_mix): x0 taken along its ODE to t_mid, then forward-noised to t > t_mid with xi
    (module docstring, step 2). x_t = (1 - t) x0 + t eps_mix holds exactly."""
    tm, tt = _bcast(t_mid, x0), _bcast(t, x0)
    r = (1 - tt) / (1 - tm)
    b = torch.sqrt((tt**2 - (r * tm) ** 2).clamp_min(0))
    x_mid = (1 - tm) * x0 + tm * eps_hat
    return r * x_mid + b * xi, (r * tm * eps_hat + b * xi) / tt


def importance_weight(eps_mix: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """exp(-mean(eps_mix^2) / 2) / exp(-mean(xi^2) / 2) per sample, (B,)."""
    B = xi.shape[0]
    return torch.exp(-0.5 * (eps_mix.float().reshape(B, -1).pow(2).mean(1) - xi.float().reshape(B, -1).pow(2).mean(1)))


def pseudo_huber(d: torch.Tensor, c: float) -> torch.Tensor:
    return torch.sqrt(d.float() ** 2 + c**2) - c


@dataclass
class Draws:
    """Per-sample draws of one update: segment k, t_mid, t and the fresh noise xi."""

    k: torch.Tensor  # (B,) long
    t_mid: torch.Tensor  # (B,) float32
    t: torch.Tensor  # (B,) float32
    xi: torch.Tensor  # like the latents


class TDMLoss:
    """The TDM losses on velocity callables; see the module docstring.

    times: the student's K + 1 segment boundaries, descending from 1 to 0.
    """

    def __init__(self, cfg: TDMConfig, times: torch.Tensor):
        self.cfg, self.times = cfg, times.float()

    @property
    def segments(self) -> int:
        return len(self.times) - 1

    def draws(self, shape: tuple[int, ...], generator: torch.Generator, device) -> Draws:
        """k uniform over the K segments; t_mid at the segment's end (or uniform inside it);
        t uniform above t_mid (inside the segment, or up to 1), kept in [t_min, 1 - t_min]."""
        c, B, T = self.cfg, shape[0], self.times
        k = torch.randint(0, self.segments, (B,), generator=generator)
        t_start, t_end = T[k], T[k + 1]
        u1, u2 = torch.rand(B, generator=generator), torch.rand(B, generator=generator)
        t_mid = t_end + u1 * (t_start - t_end) if c.random_mid else t_end
        top = t_start if c.within_segment else torch.ones(B)
        t = (t_mid + u2 * (top - t_mid)).clamp(c.t_min, 1 - c.t_min)
        t_mid = torch.minimum(t_mid, t)  # after the clamp t_mid <= t still holds
        xi = torch.randn(shape, generator=generator)
        return Draws(k, t_mid.to(device), t.to(device), xi.to(device))

    @torch.no_grad()
    def rollout(self, student: Velocity, noise: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, velocities) of the student's K-step Euler sampler from `noise`, for the
        segment starts 0..upto: states[:, k] = x_{t_k} and velocities[:, k] = v(x_{t_k}, t_k)."""
        x, states, vels = noise, [], []
        B = noise.shape[0]
        for k in range(upto + 1):
            t, s = self.times[k].to(x.device), self.times[k + 1].to(x.device)
            v = student(x, t.expand(B), True).to(x.dtype)
            states.append(x)
            vels.append(v)
            x = x + (s - t) * v
        return torch.stack(states, 1), torch.stack(vels, 1)

    def pick(self, states: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return states[torch.arange(states.shape[0], device=states.device), k.to(states.device)]

    def fake_loss(self, fake: Velocity, x_k: torch.Tensor, v_k: torch.Tensor, dr: Draws) -> tuple[torch.Tensor, dict]:
        """The fake score's weighted regression on the student's re-noised predictions (step 3)."""
        t_k = self.times.to(x_k.device)[dr.k.to(x_k.device)]
        x0_hat, eps_hat = x0_of(x_k, v_k, t_k).detach(), eps_of(x_k, v_k, t_k).detach()
        x_t, eps_mix = renoise(x0_hat, eps_hat, dr.t_mid, dr.t, dr.xi)
        x0_fake = x0_of(x_t, fake(x_t, dr.t, True), dr.t)
        B = x_t.shape[0]
        snr = ((1 - dr.t) / dr.t).pow(2).clamp(max=self.cfg.snr_cap)
        w = importance_weight(eps_mix, dr.xi)
        per = (x0_fake.float() - x0_hat.float()).pow(2).reshape(B, -1).mean(1)
        loss = (per * snr * w).mean()
        return loss, {"fake_mse": per.mean().detach(), "is_weight": w.mean().detach()}

    def student_loss(self, student: Velocity, teacher: Velocity, fake: Velocity, x_k: torch.Tensor,
                     dr: Draws) -> tuple[torch.Tensor, dict]:
        """The student's pseudo-Huber loss towards x0_hat + (x0_T - x0_F) (step 4)."""
        t_k = self.times.to(x_k.device)[dr.k.to(x_k.device)]
        v = student(x_k, t_k, True)
        x0_hat = x0_of(x_k, v, t_k)
        with torch.no_grad():
            eps_hat = eps_of(x_k, v, t_k).detach()
            x_t, _ = renoise(x0_hat.detach(), eps_hat, dr.t_mid, dr.t, dr.xi)
            v_c = teacher(x_t, dr.t, True)
            g = self.cfg.guidance
            v_t = v_c + g * (v_c - teacher(x_t, dr.t, False)) if g else v_c
            x0_teacher = x0_of(x_t, v_t, dr.t).float()
            x0_fake = x0_of(x_t, fake(x_t, dr.t, True), dr.t).float()
            target = x0_hat.detach().float() + (x0_teacher - x0_fake)
            B = x_k.shape[0]
            norm = (x0_hat.detach().float() - x0_teacher).abs().reshape(B, -1).mean(1).clamp_min(1e-8)
        per = pseudo_huber(x0_hat.float() - target, self.cfg.huber_c).reshape(B, -1).mean(1)
        loss = (per / norm).mean()
        gap = (x0_teacher - x0_fake).abs().reshape(B, -1).mean(1)
        return loss, {"teacher_fake_gap": gap.mean(), "teacher_gap": norm.mean()}


# ---------------------------------------------------------------- the stage


class TDMStage(PromptedStage):
    """Teacher (frozen), student ("model") and fake score ("fake_score"); see the module docstring."""

    section = "tdm"

    def __init__(self, cfg: TrainConfig, d: Dist, data, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        t = self.g
        init_from, which = cfg.checkpoint.init_from, cfg.checkpoint.init_weights
        lora = cfg.stage.lora if cfg.stage.lora.rank > 0 else None
        # On resume full weights come from the checkpoint; a LoRA student's base is the teacher again.
        fresh = resume_dir is None
        student, info = build_dit(cfg, d, init_from=init_from if fresh or lora else None, init_weights=which,
                                  lora=lora)
        self.student = student
        self.trainables["model"] = Trainable.create(student, cfg, info)
        fake, fake_info = build_dit(cfg, d, init_from=init_from if fresh else None, init_weights=which)
        self.fake = fake
        fake_opt = replace(cfg.optimizer, lr=cfg.optimizer.lr * t.fake_lr_ratio)
        self.trainables["fake_score"] = Trainable.create(fake, cfg, fake_info, ema_decay=0.0, optimizer_cfg=fake_opt)
        teacher, teacher_info = build_dit(cfg, d, init_from=init_from, init_weights=which, trainable=False)
        self.teacher = teacher
        self.frozen["teacher"] = teacher_info
        self.loss = TDMLoss(t, sampling_times(t.segments, self.tokens, t.mu))
        log.info("tdm: %d-step student (%s, mu %g) from a teacher at guidance %g; fake score lr x%g, %d update(s) "
                 "per student update", t.segments, f"LoRA rank {lora.rank}" if lora else "full weights", t.mu,
                 t.guidance, t.fake_lr_ratio, t.fake_updates)

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        super().validate_config(cfg)
        cfg.stage.tdm.validate()
        if not cfg.checkpoint.init_from:
            raise ValueError("stage.kind=tdm needs checkpoint.init_from: the teacher (and the student's and the fake "
                             "score's starting weights)")

    def sampler(self):
        from trainer.sample import turbo_sampler  # the student samples as it was trained

        return turbo_sampler(self.cfg)

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.stage.steps, self.cfg.optimizer)
        set_lr(self.trainables["model"].optimizer, lr)
        set_lr(self.trainables["fake_score"].optimizer, lr * self.g.fake_lr_ratio)
        return lr

    def _draws(self, step: int, B: int, purpose: str) -> Draws:
        gen = torch.Generator().manual_seed(self._seed(step, purpose))
        c, (h, w) = self.cfg.model.latent_channels, self.latent_hw
        p = self.cfg.model.patch_size
        return self.loss.draws((B, (h // p) * (w // p), c * p * p), gen, self.d.device)

    def step(self, step: int) -> dict:
        cfg, t = self.cfg, self.g
        lr = self.set_lr(step)
        B = cfg.stage.global_batch_size // self.d.world_size
        text = self._text(self.draw_prompts(step, cfg.stage.global_batch_size))
        c, (h, w) = cfg.model.latent_channels, self.latent_hw
        gen = torch.Generator().manual_seed(self._seed(step, "noise"))
        noise = patchify(torch.randn(B, c, h, w, generator=gen), cfg.model.patch_size).to(self.d.device)
        fake_draws = [self._draws(step, B, f"fake{u}") for u in range(t.fake_updates)]
        student_draws = self._draws(step, B, "student")
        # Every rank rolls out as far as the furthest segment any rank drew: the same number
        # of forwards everywhere, as FSDP's collectives need.
        upto = max(int(dr.k.max()) for dr in [*fake_draws, student_draws])
        upto = max(self.d.all_objects(upto)) if self.d.world_size > 1 else upto
        states, vels = self.rollout(text, noise, upto)
        out: dict = {}
        for dr in fake_draws:
            fake_norm, fake_ok = self.fake_update(text, states, vels, dr, step, out, 1 / len(fake_draws))
        grad_norm, applied = self.student_update(text, states, student_draws, step, out)
        return {**out, "grad_norm": grad_norm, "fake_grad_norm": fake_norm, "lr": lr, "data_s": 0.0,
                "skipped": not (applied and fake_ok), "segment_max": upto}

    # ---------------------------------------------------------------- the three phases of a step
    def _chunks(self, B: int) -> list[slice]:
        return [slice(i, min(i + self.g.micro_batch, B)) for i in range(0, B, self.g.micro_batch)]

    def _vel(self, model, text, sl: slice) -> Velocity:
        return self._velocity(model, *(x[sl] for x in text))

    def rollout(self, text, noise: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's states and velocities at segment starts 0..upto (no grad, eval mode)."""
        states, vels = [], []
        was_training = self.student.training
        self.student.eval()
        for sl in self._chunks(noise.shape[0]):
            with autocast(self.cfg, self.d):
                s_, v_ = self.loss.rollout(self._vel(self.student, text, sl), noise[sl], upto)
            states.append(s_)
            vels.append(v_)
        self.student.train(was_training)
        return torch.cat(states), torch.cat(vels)

    def fake_update(self, text, states, vels, dr: Draws, step: int, out: dict, weight: float = 1.0):
        """One fake-score update on the student's re-noised predictions; (grad norm, applied)."""
        B = states.shape[0]
        x_k, v_k = self.loss.pick(states, dr.k), self.loss.pick(vels, dr.k)
        for sl in self._chunks(B):
            with autocast(self.cfg, self.d):
                loss, terms = self.loss.fake_loss(self._vel(self.fake, text, sl), x_k[sl], v_k[sl], _slice(dr, sl))
            (loss * ((sl.stop - sl.start) / B)).backward()
            _add(out, {"fake_loss": loss.detach(), **terms}, (sl.stop - sl.start) / B * weight)
        return update(self.trainables["fake_score"], self.cfg.optimizer.grad_clip, step, "fake_score")

    def student_update(self, text, states, dr: Draws, step: int, out: dict):
        """One student update towards the teacher's guided prediction against the fake score's."""
        B = states.shape[0]
        x_k = self.loss.pick(states, dr.k)
        for sl in self._chunks(B):
            with autocast(self.cfg, self.d):
                loss, terms = self.loss.student_loss(self._vel(self.student, text, sl), self._vel(self.teacher, text, sl),
                                                     self._vel(self.fake, text, sl), x_k[sl], _slice(dr, sl))
            (loss * ((sl.stop - sl.start) / B)).backward()
            _add(out, {"loss": loss.detach(), **terms}, (sl.stop - sl.start) / B)
        # The teacher and the fake score ran under no_grad here: only the student has gradients.
        return update(self.trainables["model"], self.cfg.optimizer.grad_clip, step)


def _slice(dr: Draws, sl: slice) -> Draws:
    return Draws(dr.k[sl], dr.t_mid[sl], dr.t[sl], dr.xi[sl])


def _add(out: dict, terms: dict, weight: float) -> None:
    for k, v in terms.items():
        out[k] = out.get(k, 0.0) + v.detach().float() * weight

