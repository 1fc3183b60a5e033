"""What the RL stages share (rl/grpo.py, rl/dpo.py): a trained policy and its frozen
reference, prompts drawn per step, the policy's own rollouts with the SDE sampler, and
their rewards.

Each step draws `prompts_per_step` of the world's training captions from (seed, step);
each rank rolls out whole groups of `group_size` images per prompt with noise from
(seed, step, rank), so a resumed run rolls out exactly what the uninterrupted one did.
The reference is the policy's initial weights, frozen (no grads, no optimizer), sharded
like the policy and never checkpointed: a resumed run rebuilds it from the same source.
"""

import logging

import torch

from data.latents import images_to_uint8
from rl.rewards import build_reward
from rl.sde import guided_velocity, sde_rollout, sde_step
from trainer.config import TrainConfig
from trainer.model import patchify, unpatchify
from trainer.parallel import Dist
from trainer.prompted import PromptedStage
from trainer.stage import Trainable, autocast, build_dit

log = logging.getLogger("k2train")


class RolloutStage(PromptedStage):
    """Policy (full weights or LoRA, trained) and reference (frozen) DiTs, rollouts and rewards.
    Subclasses name their settings section (`section`: stage.grpo, stage.dpo)."""

    def __init__(self, cfg: TrainConfig, d: Dist, data, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        init_from = cfg.checkpoint.init_from
        lora = cfg.stage.lora if cfg.stage.lora.rank > 0 else None
        policy, info = build_dit(cfg, d, init_from=None if resume_dir and lora is None else init_from,
                                 init_weights=cfg.checkpoint.init_weights, lora=lora)
        self.policy = policy
        self.trainables["model"] = Trainable.create(policy, cfg, info)
        reference, ref_info = build_dit(cfg, d, init_from=init_from, init_weights=cfg.checkpoint.init_weights,
                                        trainable=False)
        self.reference = reference
        self.frozen["reference"] = ref_info
        options = {name: dict(o) for name, o in self.g.reward_options.items()}
        self.reward = build_reward(dict(self.g.rewards), data.world, options) if self.draws_prompts() else None

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        super().validate_config(cfg)
        g = getattr(cfg.stage, cls.section)
        g.validate(1)
        if not cfg.checkpoint.init_from:
            raise ValueError(f"stage.kind={cfg.stage.kind} needs checkpoint.init_from: the policy and its frozen "
                             f"reference start from a trained model")
        images, what = cls.images_per_step(g)
        if cfg.stage.global_batch_size != images:
            raise ValueError(f"stage.global_batch_size={cfg.stage.global_batch_size} must equal the {what} = {images}")

    @classmethod
    def images_per_step(cls, g) -> tuple[int, str]:
        """(images a step trains on, how that number is made, for the error message)."""
        return g.prompts_per_step * g.group_size, (f"rollout's images per step, stage.{cls.section}.prompts_per_step"
                                                   f" x group_size")

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, step: int) -> dict:
        """This rank's groups of the step: prompts, text features, the trajectory (rl/sde.py),
        rewards of the decoded images and each image's group."""
        g = self.g
        prompts = [p for p in self.draw_prompts(step, g.prompts_per_step) for _ in range(g.group_size)]
        text, mask, null, null_mask = self._text(prompts)
        c, (h, w) = self.cfg.model.latent_channels, self.latent_hw
        gen = torch.Generator().manual_seed(self._seed(step, "noise"))
        noise = patchify(torch.randn(len(prompts), c, h, w, generator=gen), self.cfg.model.patch_size).to(self.d.device)
        velocity = self._velocity(self.policy, text, mask, null, null_mask)
        was_training = self.policy.training
        self.policy.eval()
        with autocast(self.cfg, self.d):
            traj = sde_rollout(velocity, noise, self.tokens, g.sample_steps, guidance=g.guidance,
                               mu=self.cfg.stage.flow.mu, noise_level=g.noise_level,
                               generator=torch.Generator().manual_seed(self._seed(step, "sde")))
        self.policy.train(was_training)
        images = self.data.latents.decode(unpatchify(traj.states[:, -1], self.cfg.model.patch_size, h, w)).clamp(-1, 1)
        images_u8 = images_to_uint8(images).numpy()
        reward = self.reward(images_u8, prompts)
        groups = torch.arange(len(prompts)) // g.group_size
        return {"prompts": prompts, "text": (text, mask, null, null_mask), "traj": traj, "reward": reward,
                "groups": groups, "x0": traj.states[:, -1]}

    def _step_logp(self, model, ro: dict, idx: torch.Tensor, j: int):
        """(log-prob of the recorded x_{j+1}, the step's Gaussian mean, its std) under `model`."""
        traj = ro["traj"]
        text, mask, null, null_mask = (x[idx.to(x.device)] for x in ro["text"])
        velocity = self._velocity(model, text, mask, null, null_mask)
        x_t = traj.states[idx, j]
        t, s = traj.times[j], traj.times[j + 1]
        v = guided_velocity(velocity, x_t, t.expand(len(idx)).to(x_t.device), self.g.guidance)
        mean, std = sde_step(v, x_t, t, s, self.g.noise_level)
        return traj.log_prob_of(traj.states[idx, j + 1], mean, std), mean, std
