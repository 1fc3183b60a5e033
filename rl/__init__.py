"""RL fine-tuning of flow models: the SDE sampler (sde.py), rewards and GRPO (grpo.py)."""
