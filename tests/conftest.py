import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer.checkpoint import list_checkpoints

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


# ---- reading finished runs (resume, preemption and Slurm tests) ------------------------------
def final_state(run_dir: str) -> dict:
    folder = os.path.join(run_dir, "checkpoints")
    step = list_checkpoints(folder)[-1]
    out = os.path.join(run_dir, "final.pt")
    dcp_to_torch_save(os.path.join(folder, f"step_{step:08d}"), out)
    return torch.load(out, weights_only=False)


def flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def assert_bitwise_equal(a: dict, b: dict):
    fa, fb = dict(flatten(a)), dict(flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), f"{k} differs"
        else:
            assert fa[k] == fb[k], f"{k}: {fa[k]} != {fb[k]}"


def last_logged_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip().endswith("}")]
    return rows[-1]["step"] if rows else 0


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, _tiny_encoder_cache) -> str:
    """A 2-step `test_tiny` run, trained once per session: the starting point of the stage
    tests (DPO, GRPO, TDM), which only read it (checkpoint.init_from)."""
    root = str(tmp_path_factory.mktemp("tiny_base"))
    run_training("experiment=test_tiny", f"run_root={root}", "name=base", "stage.steps=2")
    return os.path.join(root, "base")


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


@pytest.fixture(scope="session", autouse=True)
def _tiny_encoder_cache(tmp_path_factory):
    # One cache of built tiny encoders for the session, shared with the training
    # subprocesses (they inherit the environment): each distinct build trains once.
    os.environ["K2_CACHE_DIR"] = str(tmp_path_factory.mktemp("k2_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, _tiny_encoder_cache) -> str:
    """The tiny encoder the demo builds: every caption of the shapes world, trained."""
    from data.shapes import ShapesWorld
    from data.shapes_loader import ensure_tiny_encoder

    return ensure_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder") / "text_encoder", ShapesWorld().all_captions())
