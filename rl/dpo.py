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

With `stage.dpo.pairs=DIR` the pairs come from a pair shard set instead (rl/pairs.py:
human or offline preferences, or the policy's ranked samples made beforehand with
`python -m rl.pairs`): each step takes `prompts_per_step` of them, drawn by (seed, step).
"""

import logging
import math

import torch
import torch.nn.functional as F

from rl.pairs import PairSet
from rl.rollout import RolloutStage
from trainer.config import TrainConfig
from trainer.flow import interpolate, sample_timesteps
from trainer.model import patchify, positions
from trainer.parallel import Dist
from trainer.stage import autocast, update

log = logging.getLogger("k2train")


class DPOStage(RolloutStage):
    """Policy and frozen reference; online pairs from the policy's own ranked samples."""

    section = "dpo"

    def __init__(self, cfg: TrainConfig, d: Dist, data, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        self.pair_set = None
        if self.g.pairs:
            self.pair_set = PairSet(self.g.pairs, cfg.data.text_len, verify=cfg.data.verify)
            c = self.pair_set.index.latents.channels
            if c != cfg.model.latent_channels:
                raise ValueError(f"stage.dpo.pairs={self.g.pairs!r} holds {c}-channel latents, the model takes "
                                 f"model.latent_channels={cfg.model.latent_channels}")
            log.info("dpo: %d pairs from %s, %d per step, beta %g", len(self.pair_set), self.g.pairs,
                     self.g.prompts_per_step, self.g.beta)
        else:
            log.info("dpo: %d prompts x %d candidates per step, beta %g", self.g.prompts_per_step,
                     self.g.group_size, self.g.beta)

    def draws_prompts(self) -> bool:
        return not self.g.pairs

    @classmethod
    def images_per_step(cls, g) -> tuple[int, str]:
        if g.pairs:
            return 2 * g.prompts_per_step, "pair images per step, 2 x stage.dpo.prompts_per_step (pairs)"
        return super().images_per_step(g)

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
        lr = self.set_lr(step)
        if self.pair_set is not None:
            out = self._stored_pairs(step)
        else:
            out = self._online_pairs(step)
        grad_norm, applied = update(self.trainables["model"], self.cfg.optimizer.grad_clip, step)
        out.update(grad_norm=grad_norm, lr=lr, data_s=0.0, skipped=not applied)
        return out

    def _online_pairs(self, step: int) -> dict:
        ro = self.rollout(step)
        win, lose, valid = self.pairs(ro)
        x0 = ro["x0"]
        text, mask, _, _ = ro["text"]
        loss_all, bracket_all = self._dpo_backward(step, x0, text, mask, win, lose, valid.float().to(x0.device),
                                                   self.positions(text.shape[1]))
        scores = ro["reward"].scores.float().to(x0.device)
        v = valid.to(x0.device)
        out = self._dpo_metrics(loss_all, bracket_all, v)
        out["reward_margin"] = (scores[win] - scores[lose])[v].mean() if bool(v.any()) else torch.zeros((), device=x0.device)
        out["reward"] = scores.mean()
        for name, val in ro["reward"].details.items():
            out[f"reward_{name}"] = torch.as_tensor(val).float().mean().to(x0.device)
        return out

    def _stored_pairs(self, step: int) -> dict:
        chosen = self.pair_set.draw(self.cfg.seed, step, self.g.prompts_per_step, self.d.rank, self.d.world_size)
        batch = self.pair_set.batch(chosen)
        latents = batch["latents"]
        h, w = latents.shape[-2:]
        p = self.cfg.model.patch_size
        dev = self.d.device
        x0 = patchify(latents, p).to(dev)
        text, mask = batch["text"].to(dev), batch["text_mask"].to(dev)
        k = len(chosen)
        win, lose = torch.arange(k), torch.arange(k, 2 * k)
        valid = torch.ones(k, dtype=torch.bool, device=dev)
        pos = positions(text.shape[1], h // p, w // p).to(dev)
        loss_all, bracket_all = self._dpo_backward(step, x0, text, mask, win, lose, valid.float(), pos)
        return self._dpo_metrics(loss_all, bracket_all, valid)

    def _dpo_backward(self, step, x0, text, mask, win, lose, weight, pos):
        """Backward of the DPO loss of pairs (x0[win], x0[lose]), weighted by `weight` and
        averaged over the weighted pairs; (per-pair losses, per-pair brackets)."""
        g, cfg = self.g, self.cfg
        n_pairs = len(win)
        gen = torch.Generator().manual_seed(self._seed(step, "pairs"))
        eps = torch.randn((n_pairs, *x0.shape[1:]), generator=gen).to(x0.device, x0.dtype)
        t = sample_timesteps(torch.randn(n_pairs, generator=gen), x0.shape[1], cfg.stage.flow).to(x0.device)
        denom = max(1.0, float(weight.sum()))
        losses, brackets = [], []
        for i in range(0, n_pairs, g.train_micro_batch):
            sl = slice(i, i + g.train_micro_batch)
            idx = torch.cat([win[sl], lose[sl]]).to(x0.device)
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
        return torch.cat(losses), torch.cat(brackets)

    @staticmethod
    def _dpo_metrics(loss_all, bracket_all, v) -> dict:
        some = bool(v.any())
        dev = loss_all.device
        return {
            "loss": loss_all[v].mean() if some else torch.tensor(math.log(2.0), device=dev),
            "implicit_acc": (bracket_all[v] < 0).float().mean() if some else torch.zeros((), device=dev),
            "pairs": v.float().sum(),
        }
