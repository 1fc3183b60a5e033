"""Training and Krablet jobs on a real two-node Slurm cluster (slurm/localcluster.py).

Each node runs one trainer process (gloo); the batch scripts are the shipped
ones, submitted through `python -m slurm.submit` or `sbatch` as a user would.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from slurm.localcluster import LocalCluster, missing_binaries
from tests.conftest import ROOT, assert_bitwise_equal, final_state, last_logged_step

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def cluster():
    if missing_binaries():
        if os.environ.get("K2_REQUIRE_SLURM"):
            pytest.fail(f"K2_REQUIRE_SLURM is set but {missing_binaries()} are missing")
        pytest.skip(f"no Slurm here ({missing_binaries()}); .ci/run installs slurm-wlm and munge")
    # Not under pytest's tmp_path: munged needs every directory above its socket world-executable.
    root = tempfile.mkdtemp(prefix="k2slurm-")
    with LocalCluster(root, nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def run_root():
    root = tempfile.mkdtemp(prefix="k2slurm-runs-")
    os.chmod(root, 0o755)
    return root


def job_env(cluster) -> dict:
    env = dict(cluster.env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(key)
    return env


def submit_training(cluster, run_root: str, name: str, *extra: str) -> str:
    cmd = [sys.executable, "-m", "slurm.submit", "experiment=test_tiny", f"name={name}", f"run_root={run_root}",
           "launcher.nodes=2", "launcher.procs_per_node=1", f"stage.steps={STEPS}", "checkpoint.every=4", *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[2]  # "submitted job <id> ..."


def slurm_log(run_dir: str, job_id: str) -> str:
    with open(os.path.join(run_dir, f"slurm-{job_id}.out")) as f:
        return f.read()


def wait_for_step(cluster, job_id: str, run_dir: str, step: int, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while last_logged_step(run_dir) < step:
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state} before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def metrics_steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def straight(cluster, run_root):
    """The uninterrupted 2-node run: the reference for the interrupted ones."""
    job = submit_training(cluster, run_root, "straight")
    info = cluster.wait(job, timeout=300)
    run_dir = os.path.join(run_root, "straight")
    log = slurm_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, log[-3000:])
    return run_dir, job, log


def test_two_node_job_runs_to_completion(straight):
    run_dir, job, log = straight
    assert "2 nodes x 1 processes" in log and "world size 2" in log
    with open(os.path.join(run_dir, "status.json")) as f:
        status = json.load(f)
    assert status["state"] == "finished" and status["step"] == STEPS and status["slurm_job_id"] == job
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))


def test_warning_signal_checkpoints_requeues_and_matches_uninterrupted(cluster, run_root, straight):
    job = submit_training(cluster, run_root, "warned")
    run_dir = os.path.join(run_root, "warned")
    wait_for_step(cluster, job, run_dir, 6)
    # What `#SBATCH --signal=USR1@300` does before the time limit: signal the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)
    info = cluster.wait(job, timeout=300)
    log = slurm_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, (info, log[-3000:])
    assert "SIGUSR1 received" in log and "preempted: requeueing" in log and "attempt 2" in log
    assert "attempt failed" not in log
    assert_bitwise_equal(final_state(straight[0]), final_state(run_dir))
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))


def _trainer_pid(job_id: str, rank: int) -> int | None:
    """The trainer process of `rank` in Slurm job `job_id` (both "nodes" are this machine)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if (b"trainer.train" in cmd and b"torch.distributed.run" not in cmd
                and env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"RANK") == str(rank).encode()):
            return int(pid)
    return None


def test_killed_process_on_one_node_resumes_from_last_checkpoint_after_requeue(cluster, run_root, straight):
    job = submit_training(cluster, run_root, "killed")
    run_dir = os.path.join(run_root, "killed")
    wait_for_step(cluster, job, run_dir, 6)
    pid = _trainer_pid(job, rank=1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # no warning: a lost node
    info = cluster.wait(job, timeout=300)
    log = slurm_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, (info, log[-3000:])
    assert "attempt failed" in log and "requeue 1 of 3" in log
    assert_bitwise_equal(final_state(straight[0]), final_state(run_dir))
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))  # the lost steps were redone once


def test_krablet_worker_array_drains_a_queue(cluster, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests", "krablet"))
    import krablet_test_kinds  # noqa: F401
    from krablet_test_helpers import count_states, executions

    from krablet.embedded import EmbeddedPostgres
    from krablet.queue import NewJob
    from krablet.schema import migrate
    from krablet.shards import ShardSet

    pg_root = tempfile.mkdtemp(prefix="k2slurm-pg-")
    with EmbeddedPostgres(pg_root, num_shards=2) as dsns:
        for dsn in dsns:
            migrate(dsn)
        log = str(tmp_path / "tally")
        ShardSet(dsns).submit([NewJob("tally", {"log": log}, key=f"job{i}") for i in range(400)])
        env = dict(job_env(cluster), KRABLET_DSNS=",".join(dsns),
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests", "krablet")]),
                   K2_PYTHON=sys.executable)
        out_dir = str(tmp_path / "logs")
        os.makedirs(out_dir)
        # 2 CPUs per task: the pool size comes from the allocation (and srun must get both CPUs).
        job = cluster.sbatch("--array=0-1", "--cpus-per-task=2", f"--output={out_dir}/krablet-%A_%a.out",
                             os.path.join(ROOT, "slurm", "krablet_worker.sbatch"), "--kinds", "krablet_test_kinds",
                             env=env, cwd=ROOT)
        for task in (0, 1):
            info = cluster.wait(f"{job}_{task}", timeout=240)
            assert info["JobState"] == "COMPLETED", info
        starts, ends = executions(log)
        assert sorted(ends) == sorted(f"job{i}" for i in range(400)) and len(starts) == 400  # each once
        assert sum(count_states(d).get("done", 0) for d in dsns) == 400
        logs = "".join(open(os.path.join(out_dir, f)).read() for f in os.listdir(out_dir))
        assert logs.count("2 worker processes") == 2  # both array tasks ran


def test_hydra_sweep_is_one_job_array_with_a_run_per_task(cluster, run_root):
    cmd = [sys.executable, "-m", "slurm.submit", "experiment=test_tiny", "name=lr_sweep", f"run_root={run_root}",
           "launcher.nodes=1", "launcher.procs_per_node=1", "stage.steps=4", "optimizer.lr=1e-3,2e-3"]
    out = subprocess.run(cmd, cwd=ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split()[2]
    assert "(2 task(s))" in out.stdout
    for task, lr in ((0, 1e-3), (1, 2e-3)):
        info = cluster.wait(f"{job}_{task}", timeout=240)
        assert info["JobState"] == "COMPLETED", info
        run_dir = os.path.join(run_root, "lr_sweep", str(task))
        with open(os.path.join(run_dir, "config.yaml")) as f:
            assert f"lr: {lr}" in f.read()
        with open(os.path.join(run_dir, "status.json")) as f:
            assert json.load(f)["state"] == "finished"


def test_submit_checks_the_config_before_anything_is_queued(tmp_path):
    """No cluster needed: the launcher composes and validates for the world size it asks for."""
    base = [sys.executable, "-m", "slurm.submit", "--dry-run", "experiment=test_tiny", f"run_root={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad_key = subprocess.run(base + ["name=a", "stage.stepz=3"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad_key.returncode == 2 and "stepz" in bad_key.stderr and "Traceback" not in bad_key.stderr
    # 3 nodes x 1 process cannot split a global batch of 8 into micro-batches of 4.
    bad_world = subprocess.run(base + ["name=b", "launcher.nodes=3", "launcher.procs_per_node=1"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
    assert bad_world.returncode == 2 and "stage.global_batch_size=8" in bad_world.stderr
    sweep_unnamed = subprocess.run(base + ["optimizer.lr=1e-3,2e-3"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert sweep_unnamed.returncode == 2 and "a sweep needs name=" in sweep_unnamed.stderr
    ok = subprocess.run(base + ["name=c", "launcher.nodes=2", "launcher.procs_per_node=1", "launcher.time=01:00:00"],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    script = (tmp_path / "c" / "train.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --time=01:00:00", "#SBATCH --requeue", "#SBATCH --signal=USR1@300",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={tmp_path}/c/slurm-%j.out",
                 "export K2_PROCS_PER_NODE=1"):
        assert line in script, line


def test_evaluation_job_after_training(cluster, straight, tmp_path):
    run_dir, train_job, _ = straight
    env = dict(job_env(cluster), K2_PYTHON=sys.executable)
    job = cluster.sbatch(f"--dependency=afterok:{train_job}", f"--output={tmp_path}/eval-%j.out",
                         os.path.join(ROOT, "slurm", "evaluate.sbatch"), run_dir, "--seeds", "1", "--steps", "2",
                         env=env, cwd=ROOT)
    info = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", (info, open(f"{tmp_path}/eval-{job}.out").read()[-3000:])
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert json.load(f)["step"] == STEPS
