"""k2train trainer: the DiT, flow matching, parallelism, checkpoints and the training loop."""
