import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer.train", *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "trainer.train", *overrides,
    ]


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    # Same thread count in every run: CPU reductions are only bitwise
    # reproducible for a fixed split of the work.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    env.pop("SLURM_JOB_ID", None)
    return env


def run_training(*overrides: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(*overrides, nproc=nproc), cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def run_root(tmp_path):
    return str(tmp_path / "runs")


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models are far faster single-threaded: with 2 cores shared by other jobs,
    # intra-op thread sync costs ~20x. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
