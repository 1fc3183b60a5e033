"""GRPO on a flow model (`stage.kind=grpo`): rollouts with the SDE sampler, group-relative
advantages from rewards, and a clipped-ratio update with KL to a frozen reference; or the
likelihood-free DiffusionNFT-style update on the same rollouts (`stage.grpo.objective=nft`).

One optimizer step of the loop is one iteration:

1. prompts: `prompts_per_step` training captions of the world, drawn from (seed, step);
   each rank rolls out whole groups of `group_size` images per prompt;
2. rollout: the policy's live weights sample with the SDE form of the flow sampler
   (rl/sde.py), recording every state and each step's log-probability; noise comes from
   (seed, step, rank), so a resumed run rolls out exactly what the uninterrupted one did;
3. rewards (rl/rewards) of the decoded images, and advantages (r - mean_group) /
   (std_group + eps), clipped to +-adv_clip;
4. `train_steps` of the SDE steps (a random subset or a sliding window) are trained on.
   The old log-probabilities are recomputed by the same training-mode forward (grad
   enabled, outputs detached, the same micro-batches in the same order) that the update
   runs, so the first inner step's ratio is exactly 1 at any rollout batch, under FSDP,
   bf16 or compile. The rollout's own log-probabilities are logged beside them
   (`logp_gap`): how far a sampler's numbers can drift from the training step's.
5. `inner_steps` updates: loss = -min(ratio A, clip(ratio, 1 +- clip_range) A) + kl_beta KL,
   KL the closed form between the policy's and the reference's Gaussian steps.

The reference is the policy's initial weights, frozen (no grads, no optimizer), sharded
like the policy and never checkpointed: a resumed run rebuilds it from the same source.
"""

import logging

import numpy as np
import torch

from rl.rewards import group_advantages
from rl.rollout import RolloutStage
from trainer.config import TrainConfig
from trainer.flow import interpolate
from trainer.objectives import sample_seed
from trainer.parallel import Dist
from trainer.stage import Trainable, autocast, update

log = logging.getLogger("k2train")


class GRPOStage(RolloutStage):
    """GRPO or the NFT-style objective on the policy's rollouts; see the module docstring."""

    section = "grpo"

    def __init__(self, cfg: TrainConfig, d: Dist, data, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        self.kl_over = 0  # iterations in a row with KL above stop_kl
        self.reward_under = 0  # ... and with the stop_reward below stop_below
        if self.g.stop_reward and self.g.stop_reward.split("/")[0] not in self.reward.weights:
            raise ValueError(f"stage.grpo.stop_reward={self.g.stop_reward!r} names no reward of this stage: "
                             f"they are {sorted(self.reward.weights)} (their logged details: reward_<name>/<key>)")
        log.info("grpo: %d prompts x %d images per iteration, %d SDE steps (%d trained, %s), objective %s",
                 self.g.prompts_per_step, self.g.group_size, self.g.sample_steps, self.g.train_steps,
                 self.g.train_window, self.g.objective)

    def _trained_steps(self, step: int) -> list[int]:
        n_sde = self.g.sample_steps - 1  # the last step, to t = 0, is an ODE step
        if self.g.train_window == "window":
            start = (step * self.g.train_steps) % max(1, n_sde - self.g.train_steps + 1)
            return list(range(start, start + self.g.train_steps))
        rng = np.random.default_rng(sample_seed(self.cfg.seed, step, "grpo:steps"))
        return sorted(rng.choice(n_sde, self.g.train_steps, replace=False).tolist())

    # ---------------------------------------------------------------- update
    def _transitions(self, ro: dict, steps: list[int]) -> list[tuple[torch.Tensor, int]]:
        """(sample indices, step index) micro-batches in a fixed order: every trajectory at each trained step."""
        B = len(ro["prompts"])
        mb = self.g.train_micro_batch
        return [(torch.arange(i, min(i + mb, B)), j) for j in steps for i in range(0, B, mb)]

    def step(self, step: int) -> dict:
        g, cfg = self.g, self.cfg
        lr = self.set_lr(step)
        ro = self.rollout(step)
        ro["adv"] = group_advantages(ro["reward"].scores, ro["groups"], clip=g.adv_clip).to(self.d.device)
        steps = self._trained_steps(step)
        batches = self._transitions(ro, steps)
        main = self.trainables["model"]
        if g.objective == "nft":
            return {**self._nft_update(ro, main, step), "lr": lr, "data_s": 0.0}
        # Old log-probs and the reference's means: the training-mode forward, detached.
        old, ref = [], []
        for idx, j in batches:
            with autocast(cfg, self.d):
                logp, _, _ = self._step_logp(self.policy, ro, idx, j)
                with torch.no_grad():
                    _, ref_mean, _ = self._step_logp(self.reference, ro, idx, j)
            old.append(logp.detach())
            ref.append(ref_mean.detach())
        # The sampler's own log-probs against the training forward's, on the same transitions.
        gap = torch.cat([(o - ro["traj"].log_probs[idx, j].to(o.device)).abs() for o, (idx, j) in zip(old, batches)])
        stats = {"ratio_first": [], "ratio": [], "clip": [], "kl_first": [], "kl": [], "logp_gap": [gap]}
        for inner in range(g.inner_steps):
            for n, (idx, j) in enumerate(batches):
                with autocast(cfg, self.d):
                    logp, mean, std = self._step_logp(self.policy, ro, idx, j)
                ratio = torch.exp(logp - old[n])
                adv = ro["adv"][idx.to(ro["adv"].device)]
                clipped = torch.clamp(ratio, 1 - g.clip_range, 1 + g.clip_range)
                policy_loss = -torch.minimum(ratio * adv, clipped * adv).mean()
                kl = ((mean - ref[n]) ** 2).flatten(1).mean(1) / (2 * std.float() ** 2)
                loss = policy_loss + g.kl_beta * kl.mean()
                (loss / len(batches)).backward()
                key = "ratio_first" if inner == 0 else "ratio"
                stats[key].append(ratio.detach())
                stats["clip"].append(((ratio - 1).abs() > g.clip_range).float().detach())
                stats["kl_first" if inner == 0 else "kl"].append(kl.detach())
            grad_norm, applied = update(main, cfg.optimizer.grad_clip, step)
        return {**self._metrics(ro, stats), "loss": loss.detach(), "grad_norm": grad_norm, "lr": lr,
                "data_s": 0.0, "skipped": not applied}

    def _nft_update(self, ro: dict, main: Trainable, step: int) -> dict:
        """DiffusionNFT-style: the policy's velocity on the forward process of its own final
        samples, pulled towards v+ = b v + (1-b) v_old for well-rewarded images and v- for
        the others, weighted by r = clip(A / (2 A_max) + 1/2, 0, 1). No likelihoods, no CFG."""
        g, cfg = self.g, self.cfg
        x0 = ro["x0"]
        B = x0.shape[0]
        adv = ro["adv"].float()
        weight = (adv / (2 * g.adv_clip) + 0.5).clamp(0, 1)
        gen = torch.Generator().manual_seed(self._seed(step, "nft"))
        eps = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        t = torch.rand(B, generator=gen).to(x0.device)
        xt = interpolate(x0, eps, t)
        target = eps - x0
        text, mask, _, _ = ro["text"]
        pos = self.positions(text.shape[1])
        chunks = [slice(i, i + g.train_micro_batch) for i in range(0, B, g.train_micro_batch)]
        v_old = []  # the rollout policy's velocities, from the training-mode forward (detached)
        for sl in chunks:
            with autocast(cfg, self.d):
                v_old.append(self.policy(xt[sl], text[sl], t[sl], pos, mask[sl]).float().detach())
        losses = []
        for inner in range(g.inner_steps):
            for sl, old in zip(chunks, v_old):
                with autocast(cfg, self.d):
                    v = self.policy(xt[sl], text[sl], t[sl], pos, mask[sl]).float()
                v_pos = g.nft_beta * v + (1 - g.nft_beta) * old
                v_neg = (1 + g.nft_beta) * old - g.nft_beta * v
                r = weight[sl].view(-1, 1, 1)
                loss = (r * (v_pos - target[sl]) ** 2 + (1 - r) * (v_neg - target[sl]) ** 2).mean()
                (loss * (xt[sl].shape[0] / B)).backward()
                losses.append(loss.detach())
            grad_norm, applied = update(main, cfg.optimizer.grad_clip, step)
        return {**self._metrics(ro, {}), "loss": torch.stack(losses).mean(), "grad_norm": grad_norm,
                "skipped": not applied}

    def _metrics(self, ro: dict, stats: dict) -> dict:
        reward = ro["reward"]
        dev = self.d.device
        out = {"reward": reward.scores.float().mean().to(dev),
               "adv_abs": ro["adv"].abs().mean(), "adv_max": ro["adv"].abs().max()}
        for name, v in reward.details.items():
            out[f"reward_{name}"] = torch.as_tensor(v).float().mean().to(dev)
        if stats.get("ratio_first"):
            first = torch.cat(stats["ratio_first"])
            out["ratio_first_dev"] = (first - 1).abs().max()
            # KL at the first inner step (the rollout policy's), and at the last when there are more.
            out["kl"] = torch.cat(stats["kl"] or stats["kl_first"]).mean()
            out["kl_first"] = torch.cat(stats["kl_first"]).mean()
            out["clip_frac"] = torch.cat(stats["clip"]).mean()
            out["logp_gap"] = torch.cat(stats["logp_gap"]).max().float()
            if stats["ratio"]:
                later = torch.cat(stats["ratio"])
                out["ratio_min"], out["ratio_max"] = later.min(), later.max()
        traj = ro["traj"]
        if traj.log_probs is not None:
            out["rollout_logp"] = traj.log_probs[:, traj.sde_mask].float().mean().to(dev) if traj.sde_mask.any() \
                else torch.zeros((), device=dev)
        return out

    def early_stop(self, values: dict) -> str | None:
        """A reason to end the run after this iteration, or None: the KL to the reference
        above stop_kl, or the reward named by stop_reward below stop_below, for
        stop_patience iterations in a row."""
        g = self.g
        reasons = []
        if g.stop_kl and "kl" in values:
            kl = float(self.d.all_reduce_mean(values["kl"].detach().clone()))  # every rank decides alike
            self.kl_over = self.kl_over + 1 if kl > g.stop_kl else 0
            if self.kl_over >= g.stop_patience:
                reasons.append(f"KL to the reference {kl:.4g} > stage.grpo.stop_kl={g.stop_kl} for "
                               f"{self.kl_over} iterations in a row")
        key = f"reward_{g.stop_reward}"
        if g.stop_reward and key in values:
            r = float(self.d.all_reduce_mean(values[key].detach().clone()))
            self.reward_under = self.reward_under + 1 if r < g.stop_below else 0
            if self.reward_under >= g.stop_patience:
                reasons.append(f"{key} {r:.4g} < stage.grpo.stop_below={g.stop_below} for {self.reward_under} "
                               f"iterations in a row")
        return "; ".join(reasons) or None
