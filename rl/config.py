"""Settings of the RL stages (`stage.grpo`, `stage.dpo`), part of the trainer's config schema."""

from dataclasses import dataclass, field


@dataclass
class GRPOConfig:
    """GRPO on flow models (rl/grpo.py). One optimizer step of the loop is one iteration:
    a rollout of `prompts_per_step` x `group_size` images with the SDE sampler, rewards,
    group-relative advantages, then `inner_steps` updates on the recorded transitions."""

    # Rollout: prompts per iteration (all ranks; each rank owns whole groups) and images per prompt.
    prompts_per_step: int = 4
    group_size: int = 8
    sample_steps: int = 10
    guidance: float = 3.0
    noise_level: float = 0.7  # a in sigma_t = a * sqrt(t / (1 - t)) (Flow-GRPO's default)
    # Which SDE steps are trained each iteration: `train_steps` of them, "random" (a fresh
    # subset per iteration) or "window" (a window that slides over the trajectory, MixGRPO).
    train_steps: int = 4
    train_window: str = "random"
    # Transitions per forward during the update (per rank): the train batch, sized apart from the rollout.
    train_micro_batch: int = 16
    inner_steps: int = 1  # optimizer updates per rollout; the first one always has ratio 1
    # Objective: "grpo" (clipped ratio with KL) or "nft" (likelihood-free, DiffusionNFT style).
    objective: str = "grpo"
    clip_range: float = 0.2
    adv_clip: float = 5.0
    kl_beta: float = 0.04
    nft_beta: float = 1.0
    # Rewards: name -> weight (rl/rewards); prompts are drawn from the world's training captions.
    rewards: dict[str, float] = field(default_factory=lambda: {"rubric": 1.0})
    # A reward's constructor options by name, e.g. {rubric: {soft: 0.03}} (rl/rewards).
    reward_options: dict[str, dict] = field(default_factory=dict)
    # Early stop: the run ends (checkpoint, status "stopped") when the mean KL to the
    # reference exceeds `stop_kl` (0: never) for `stop_patience` iterations in a row.
    stop_kl: float = 0.0
    # ... or when the mean of a logged reward (`reward_<stop_reward>` in the step log: a
    # reward's name such as "artifact", the artifact reward's P(clean), or "<name>/<detail>")
    # falls below `stop_below` ("": never).
    stop_reward: str = ""
    stop_below: float = 0.0
    stop_patience: int = 3

    def validate(self, world_size: int) -> None:
        from trainer.config import POSITIVE, NON_NEGATIVE, check, one_of

        check("stage.grpo", self, prompts_per_step=POSITIVE, group_size=POSITIVE, sample_steps=POSITIVE,
              noise_level=NON_NEGATIVE, train_steps=POSITIVE, train_window=one_of("random", "window"),
              train_micro_batch=POSITIVE, inner_steps=POSITIVE, objective=one_of("grpo", "nft"),
              clip_range=POSITIVE, adv_clip=POSITIVE, kl_beta=NON_NEGATIVE, nft_beta=POSITIVE,
              stop_kl=NON_NEGATIVE, stop_patience=POSITIVE)

        if self.group_size < 2:
            raise ValueError(f"stage.grpo.group_size must be >= 2 (advantages are relative to the group), "
                             f"got {self.group_size}")
        if self.prompts_per_step % world_size:
            raise ValueError(f"stage.grpo.prompts_per_step={self.prompts_per_step} must divide by the world size "
                             f"{world_size}: each rank rolls out whole groups")
        if self.train_steps > self.sample_steps - 1:
            raise ValueError(f"stage.grpo.train_steps={self.train_steps} must be at most sample_steps - 1 = "
                             f"{self.sample_steps - 1} (the last step to t = 0 is deterministic)")
        if not self.rewards or any(w < 0 for w in self.rewards.values()):
            raise ValueError(f"stage.grpo.rewards must name at least one reward with a weight >= 0, "
                             f"got {dict(self.rewards)}")


@dataclass
class DPOConfig:
    """Diffusion-DPO in flow form (rl/dpo.py). Each step the policy rolls out `group_size`
    images for each of `prompts_per_step` prompts; the best and the worst by reward form a
    (winner, loser) pair when their rewards differ by more than `min_margin`."""

    prompts_per_step: int = 8
    group_size: int = 4
    sample_steps: int = 10
    guidance: float = 3.0
    noise_level: float = 0.0  # 0: the ODE sampler (candidates differ by their noise seeds)
    beta: float = 100.0  # on the per-element mean squared errors
    min_margin: float = 0.0
    train_micro_batch: int = 16  # pairs per forward (per rank)
    rewards: dict[str, float] = field(default_factory=lambda: {"rubric": 1.0})
    reward_options: dict[str, dict] = field(default_factory=dict)  # as GRPOConfig.reward_options
    # A pair shard set (rl/pairs.py) to train on instead of online pairs: each step takes
    # prompts_per_step of its (winner, loser) pairs; group_size, sample_steps, guidance,
    # noise_level, min_margin and rewards are then unused.
    pairs: str | None = None

    def validate(self, world_size: int) -> None:
        from trainer.config import POSITIVE, NON_NEGATIVE, check

        check("stage.dpo", self, prompts_per_step=POSITIVE, group_size=POSITIVE, sample_steps=POSITIVE,
              noise_level=NON_NEGATIVE, beta=POSITIVE, min_margin=NON_NEGATIVE, train_micro_batch=POSITIVE)
        if self.group_size < 2:
            raise ValueError(f"stage.dpo.group_size must be >= 2 (a pair needs two candidates), got {self.group_size}")
        if self.prompts_per_step % world_size:
            raise ValueError(f"stage.dpo.prompts_per_step={self.prompts_per_step} must divide by the world size "
                             f"{world_size}: each rank rolls out whole groups")
        if not self.rewards or any(w < 0 for w in self.rewards.values()):
            raise ValueError(f"stage.dpo.rewards must name at least one reward with a weight >= 0, "
                             f"got {dict(self.rewards)}")
