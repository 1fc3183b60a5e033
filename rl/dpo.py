"""Diffusion-DPO in flow form (`stage.kind=dpo`), on pairs the policy makes itself.

Each step the policy rolls out `group_size` candidates per prompt (rl/rollout.py), the
reward ranks them, and the best and the worst of a group form a (winner, loser) pair
when their rewards differ by more than `min_margin`. Winner and loser share the noise
and the timestep; with e = mean((v_target - v)^2) over a sample's elements,

    loss = -log sigmoid(-beta / 2 * [(e_w(policy) - e_w(ref)) - (e_l(policy) - e_l(ref))])

on the conditional velocity (no guidance in training). Before the first update the
policy is the reference, the bracket is 0 and the loss is exactly ln 2. Logged: the loss,
the implicit accuracy (share of pairs with a negative bracket: the policy prefers the
winner more than the reference does), the reward margin of the pairs and how many
groups gave one.
"""

import logging
import math

import torch
import torch.nn.functional as F

from rl.rollout import RolloutStage
from trainer.config import TrainConfig
from trainer.flow import interpolate, sample_timesteps
from trainer.parallel import Dist
from trainer.stage import autocast, update

log = logging.getLogger("k2train")


class DPOStage(RolloutStage):
    """Policy and frozen reference; online pairs from the policy's own ranked samples."""

    section = "dpo"

    def __init__(self, cfg: TrainConfig, d: Dist, data, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        log.info("dpo: %d prompts x %d candidates per step, beta %g", self.g.prompts_per_step, self.g.group_size,
                 self.g.beta)

    def pairs(self, ro: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(winner indices, loser indices, valid) per group: best and worst by reward."""
        scores = ro["reward"].scores.float()
        G = self.g.group_size
        grouped = scores.view(-1, G)
        win = grouped.argmax(1) + torch.arange(grouped.shape[0]) * G
        lose = grouped.argmin(1) + torch.arange(grouped.shape[0]) * G
        valid = (scores[win] - scores[lose]) > self.g.min_margin
        return win, lose, valid

    def step(self, step: int) -> dict:
        g, cfg = self.g, self.cfg
        lr = self.set_lr(step)
        ro = self.rollout(step)
        win, lose, valid = self.pairs(ro)
        n_pairs = len(win)
        x0 = ro["x0"]
        gen = torch.Generator().manual_seed(self._seed(step, "pairs"))
        eps = torch.randn((n_pairs, *x0.shape[1:]), generator=gen).to(x0.device, x0.dtype)
        t = sample_timesteps(torch.randn(n_pairs, generator=gen), self.tokens, cfg.stage.flow).to(x0.device)
        text, mask, _, _ = ro["text"]
        pos = self.positions(text.shape[1])
        weight = valid.float().to(x0.device)
        denom = max(1.0, float(weight.sum()))
        losses, brackets = [], []
        for i in range(0, n_pairs, g.train_micro_batch):
            sl = slice(i, i + g.train_micro_batch)
            idx = torch.cat([win[sl], lose[sl]])
            x_t = interpolate(x0[idx], torch.cat([eps[sl], eps[sl]]), torch.cat([t[sl], t[sl]]))
            target = torch.cat([eps[sl], eps[sl]]) - x0[idx]
            tt = torch.cat([t[sl], t[sl]])
            with autocast(cfg, self.d):
                v = self.policy(x_t, text[idx], tt, pos, mask[idx]).float()
                with torch.no_grad():
                    v_ref = self.reference(x_t, text[idx], tt, pos, mask[idx]).float()
            err = (v - target).pow(2).flatten(1).mean(1)
            err_ref = (v_ref - target).pow(2).flatten(1).mean(1)
            k = win[sl].shape[0]
            bracket = (err[:k] - err_ref[:k]) - (err[k:] - err_ref[k:])
            loss_k = -F.logsigmoid(-g.beta / 2 * bracket)
            (loss_k * weight[sl]).sum().div(denom).backward()
            losses.append(loss_k.detach())
            brackets.append(bracket.detach())
        grad_norm, applied = update(self.trainables["model"], cfg.optimizer.grad_clip, step)
        loss_all, bracket_all = torch.cat(losses), torch.cat(brackets)
        scores = ro["reward"].scores.float().to(x0.device)
        v = valid.to(x0.device)
        some = bool(v.any())
        out = {
            "loss": loss_all[v].mean() if some else torch.tensor(math.log(2.0), device=x0.device),
            "implicit_acc": (bracket_all[v] < 0).float().mean() if some else torch.zeros((), device=x0.device),
            "reward_margin": (scores[win] - scores[lose])[v].mean() if some else torch.zeros((), device=x0.device),
            "pairs": v.float().sum(),
            "reward": scores.mean(),
            "grad_norm": grad_norm, "lr": lr, "data_s": 0.0, "skipped": not applied,
        }
        for name, val in ro["reward"].details.items():
            out[f"reward_{name}"] = torch.as_tensor(val).float().mean().to(x0.device)
        return out
