"""MetricsLogger: W&B runs that survive a requeue, and the step-time / ETA fields of the log line."""

import glob
import json
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from trainer import metrics
from trainer.metrics import MetricsLogger, duration, wandb_run_id


def make_logger(run_dir, start_step=0, total_steps=100, **kw) -> MetricsLogger:
    return MetricsLogger(str(run_dir), True, start_step, total_steps, 1.0, 16, None, 1, torch.device("cpu"),
                         tensorboard=False, **kw)


def wandb_records(path: str):
    """The records of a .wandb transaction log. wandb 0.31 ships no Python reader (wandb-core
    writes it), but the format is LevelDB's log: 32 KiB blocks of chunks, each with a 7-byte
    header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), after W&B's own 7-byte
    header (":W&B", magic, version); a chunk header never straddles a block."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeroed tail
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def offline_runs(run_dir) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of each offline W&B process in run_dir, oldest first."""
    runs = []
    for path in glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb")):
        records = list(wandb_records(path))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
        runs.append((run.start_time.ToNanoseconds(), run.run_id, rows))
    return [(run_id, rows) for _, run_id, rows in sorted(runs)]


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keeps W&B's settings, cache and staging inside tmp_path (offline mode needs no network or login)."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_wandb_offline_run_resumes_with_each_step_once(tmp_path, wandb_home):
    import wandb  # only this test needs it; the others run without paying for its import

    run_dir = tmp_path / "my run.v2"
    run_dir.mkdir()
    kw = dict(wandb=True, wandb_mode="offline", run_name="my run.v2", config={"seed": 7})
    # The first job logs 1..5, then crashes after its checkpoint of step 3.
    first = make_logger(run_dir, **kw)
    for step in range(1, 6):
        first.count(16)
        first.log(step, {"loss": step / 10})
    first.image("samples", np.full((4, 6, 3), 200, np.uint8), 5)
    first.close()
    # The requeued job resumes at step 3 and logs 4..8 again with new values.
    second = make_logger(run_dir, start_step=3, **kw)
    for step in range(4, 9):
        second.count(16)
        second.log(step, {"loss": step / 10 + 1})
    second.image("samples", np.zeros((4, 6, 3), np.uint8), 8)
    second.close()
    # finish() can return before wandb-core has flushed the offline file; shutting the
    # service down (what exiting the process does) waits for it.
    wandb.teardown()

    runs = offline_runs(run_dir)
    assert [run_id for run_id, _ in runs] == ["my-run-v2-fd22150b"] * 2  # one W&B run, two processes
    history = [row for _, rows in runs for row in rows]
    # Each step once, in order. 4 and 5 keep the first job's values: W&B cannot rewrite
    # them, and the second job does not send them again.
    assert [row["_step"] for row in history] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [row["loss"] for row in history] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 1.6, 1.7, 1.8])
    assert all(row["step_s"] > 0 and row["samples_per_s"] > 0 for row in history)
    # Images share the step's row; the resumed job's image at 8 is new, so it is sent.
    assert [row["_step"] for row in history if "samples/_type" in row] == [5, 8]
    assert history[4]["samples/_type"] == "image-file"
    # metrics.jsonl reads as one run too, with the resumed job's values.
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == pytest.approx([0.1, 0.2, 0.3, 1.4, 1.5, 1.6, 1.7, 1.8])


def test_wandb_run_id_is_the_run_name_made_legal():
    assert wandb_run_id("pretrain_256-a") == "pretrain_256-a"
    assert wandb_run_id("my run.v2") == "my-run-v2-fd22150b"  # sha1 of the name: the same in every job
    assert wandb_run_id("a.b") != wandb_run_id("a/b")


def test_step_time_and_eta_in_the_log_line(tmp_path):
    logger = make_logger(tmp_path, total_steps=100)
    row = {"step": 10, "loss": 0.5, "samples_per_s": 8.0, "tokens_per_s": 128.0, "data_wait": 0.01,
           "step_s": 2.0, "memory_gib": 1.0, "repa": 0.25}
    assert logger.format(row) == ("step 10/100 | loss 0.5000 | 8.0 samples/s | 128 tok/s | mfu - | 1.0 GiB | "
                                  "data 1.0% | 2.00 s/step | eta 3m00s | repa 0.2500")
    assert [duration(s) for s in (0, 45, 59.6, 750, 3599, 3600 + 5 * 60 + 29, 27 * 3600)] == [
        "0s", "45s", "1m00s", "12m30s", "59m59s", "1h05m", "27h00m"]


def test_step_time_is_per_optimizer_step_and_eta_forgets_warm_up(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    logger = make_logger(tmp_path, total_steps=1000)
    line = []
    # Rows every 10 steps: the first window holds 60 s of warm-up, then 1.0 and 2.0 s/step.
    for step, window_s in ((10, 69.0), (20, 10.0), (30, 20.0)):
        for _ in range(10):
            logger.count(16)
        clock[0] += window_s
        row = logger.log(step, {"loss": 1.0})
        line.append(logger.format(row).split(" | ")[-2:])
    assert line[0] == ["6.90 s/step", "eta 1h53m"]  # 990 × 6.9 s: only warm-up known yet
    assert line[1] == ["1.00 s/step", "eta 16m20s"]  # 980 × 1.0 s: warm-up forgotten
    assert line[2] == ["2.00 s/step", "eta 21m01s"]  # 970 × (0.7 × 1.0 + 0.3 × 2.0) s
    assert row["step_s"] == 2.0 and row["samples_per_s"] == 8.0


def test_without_wandb_it_is_never_imported(tmp_path):
    code = (
        "import sys, numpy, torch\n"
        "from trainer.metrics import MetricsLogger\n"
        f"m = MetricsLogger({str(tmp_path)!r}, True, 0, 10, 1.0, 16, None, 1, torch.device('cpu'))\n"
        "m.count(4); m.log(1, {'loss': 0.5}); m.image('samples', numpy.zeros((4, 4, 3), 'uint8'), 1)\n"
        "m.close()\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "tensorboard")  # the logger really ran, TensorBoard included
