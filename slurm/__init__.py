"""Slurm: batch scripts, the launcher (`python -m slurm.submit`) and a local test cluster."""
