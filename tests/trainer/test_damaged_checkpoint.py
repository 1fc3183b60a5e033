"""A damaged checkpoint is never loaded: the restart names the bad file, sets the checkpoint
aside, resumes from the previous one and ends bitwise equal to an uninterrupted run."""

import glob
import json
import os
import shutil
import subprocess

import pytest
import torch

from tests.conftest import ROOT, assert_bitwise_equal, final_state, run_training, train_cmd, train_env
from trainer import checksums
from trainer.checkpoint import Checkpointer, TrainState, list_checkpoints
from trainer.preemption import read_status

ARGS = ["experiment=test_tiny"]  # 12 steps, a checkpoint every 3, keep 2


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run (its run dir, and its final state read before anything is damaged)."""
    run_root = str(tmp_path_factory.mktemp("straight"))
    run_training(*ARGS, f"run_root={run_root}", "name=straight")
    run_dir = os.path.join(run_root, "straight")
    state = final_state(run_dir)
    os.remove(os.path.join(run_dir, "final.pt"))
    return run_dir, state


def _distcp(step_dir):
    return sorted(glob.glob(os.path.join(step_dir, "*.distcp")))[0]


def overwrite(path, offset=None, data=b"\xff" * 4096):
    """Bytes changed in place: the file keeps its size."""
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data[: size - offset])


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def legacy(step_dir):
    """A checkpoint as written before checksums existed: no checksums.json, no flag."""
    os.remove(os.path.join(step_dir, checksums.MANIFEST))
    path = os.path.join(step_dir, "train_state.json")
    with open(path) as f:
        state = json.load(f)
    state.pop("checksummed")
    with open(path, "w") as f:
        json.dump(state, f)


# (what is done to the newest checkpoint, the file the restart must name)
DAMAGE = {
    "distcp bytes in place": (lambda s: overwrite(_distcp(s)), ".distcp: sha256 mismatch"),
    "distcp truncated": (lambda s: truncate(_distcp(s)), ".distcp: "),
    "distcp deleted": (lambda s: os.remove(_distcp(s)), ".distcp: missing"),
    "train_state truncated": (lambda s: truncate(os.path.join(s, "train_state.json")), "train_state.json: "),
    "rng file in place": (lambda s: overwrite(os.path.join(s, "rank_00000.pt"), 0, b"\x00" * 64),
                          "rank_00000.pt: sha256 mismatch"),
    "rng file deleted": (lambda s: os.remove(os.path.join(s, "rank_00000.pt")), "rank_00000.pt: missing"),
    "metadata deleted": (lambda s: os.remove(os.path.join(s, ".metadata")), ".metadata: missing"),
    "checksums deleted": (lambda s: os.remove(os.path.join(s, checksums.MANIFEST)), "checksums.json: missing"),
    "checksums truncated": (lambda s: truncate(os.path.join(s, checksums.MANIFEST)), "checksums.json: unreadable"),
    # Checkpoints from before checksums: what loading and the finite check still catch.
    "legacy distcp bytes in place": (lambda s: (legacy(s), overwrite(_distcp(s))), "non-finite values"),
    "legacy distcp truncated": (lambda s: (legacy(s), truncate(_distcp(s))), "loading failed"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(damage, straight, tmp_path):
    src, reference = straight
    run_dir = str(tmp_path / "runs" / "straight")
    shutil.copytree(src, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    assert list_checkpoints(ckpts) == [9, 12]
    harm, named = DAMAGE[damage]
    harm(os.path.join(ckpts, "step_00000012"))

    proc = run_training(*ARGS, f"run_root={tmp_path / 'runs'}", "name=straight")

    assert "checkpoint " + os.path.join(ckpts, "step_00000012") + " is damaged" in proc.stderr
    assert named in proc.stderr, proc.stderr[-3000:]
    assert "resumed from " + os.path.join(ckpts, "step_00000009") in proc.stderr
    # set aside with the reason, never deleted; keep-last-2 counts only good checkpoints
    (aside,) = glob.glob(os.path.join(ckpts, "damaged", "step_00000012-*"))
    with open(os.path.join(aside, "DAMAGED.txt")) as f:
        assert named.split(":")[-1].strip() in f.read()
    assert list_checkpoints(ckpts) == [9, 12]
    assert read_status(run_dir)["state"] == "finished"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 13))
    assert_bitwise_equal(reference, final_state(run_dir))


def test_every_checkpoint_damaged_starts_over_and_keeps_them_aside(straight, tmp_path):
    src, reference = straight
    run_dir = str(tmp_path / "runs" / "straight")
    shutil.copytree(src, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    for step in (9, 12):
        truncate(os.path.join(ckpts, f"step_{step:08d}", "train_state.json"))
    run_training(*ARGS, f"run_root={tmp_path / 'runs'}", "name=straight")
    assert len(os.listdir(os.path.join(ckpts, "damaged"))) == 2
    assert_bitwise_equal(reference, final_state(run_dir))


def test_a_weight_that_goes_inf_fails_the_run_before_it_is_checkpointed(run_root):
    """Finite gradients, but the update leaves an inf in a weight at step 5: the run stops
    at step 5 naming the tensor, status "failed", and step 6's checkpoint is never written."""
    proc = subprocess.run(train_cmd(*ARGS, f"run_root={run_root}", "name=poison",
                                    "stage.kind=tests.trainer.stages:PoisonStage", "log.every=3"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # log.every=3: found at the next check, step 6, which is also a checkpoint step
    assert "step 6: non-finite values in" in proc.stderr and "model.final.linear.weight" in proc.stderr
    run_dir = os.path.join(run_root, "poison")
    assert read_status(run_dir)["state"] == "failed"
    assert list_checkpoints(os.path.join(run_dir, "checkpoints")) == [3]


def test_checkpoint_files_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """A power loss after the rename must not leave an empty train_state.json or RNG file:
    each file's data is fsynced before its name appears (spied on the real os calls)."""
    from trainer.config import CheckpointConfig
    from trainer.parallel import Dist

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.fspath(a)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(), Dist(0, 1, 0, torch.device("cpu"), None))
    ckpt.save(TrainState(step=1), {}, {"stage": {"x": torch.ones(3)}}, {})
    for name in ("train_state.json", "rank_00000.pt", "models.json", checksums.MANIFEST):
        tmp = next(p for kind, p in events if kind == "replace" and p.endswith(name + ".tmp"))
        assert ("fsync", tmp) in events[: events.index(("replace", tmp))], name
    assert checksums.verify(ckpt.path(1)) == []


def test_weights_read_outside_a_run_are_verified_first(straight, tmp_path):
    """init_from, evaluate, sample and export read through load_weights: a damaged
    checkpoint there is an error naming the file (never replaced by an older one)."""
    from trainer.checkpoint import CheckpointError
    from trainer.weights import load_weights

    src, reference = straight
    step_dir = str(tmp_path / "step_00000012")
    shutil.copytree(os.path.join(src, "checkpoints", "step_00000012"), step_dir)
    ema = load_weights(step_dir).state_dict()
    assert all(torch.equal(ema[k], reference["ema"][k]) for k in ema)
    overwrite(_distcp(step_dir))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: sha256 mismatch"):
        load_weights(step_dir)
