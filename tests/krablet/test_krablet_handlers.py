"""Handlers that misbehave: a result that is not JSON fails its job alone; a lost lease
reaches the handler as a cancellation."""

import threading
import time

import psycopg
import pytest
from krablet_test_helpers import wait_for

import krablet_test_kinds  # noqa: F401  (registers "bad_result" and "watch_lease")
from krablet.kinds import JobContext, LeaseLost
from krablet.queue import NewJob
from krablet.shards import ShardSet
from krablet.worker import Worker, WorkerConfig


def rows(dsn):
    with psycopg.connect(dsn) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT key, state, attempts, errors FROM krablet_job_states")}


def test_a_result_that_is_not_json_fails_that_job_and_the_worker_goes_on(make_shards):
    dsns = make_shards(1)
    poison = ["set", "nan", "bytes", "nul"]
    ShardSet(dsns).submit([NewJob("bad_result", {"what": w}, key=f"bad-{w}", max_attempts=2) for w in poison]
                          + [NewJob("noop", {"i": i}, key=f"ok{i}") for i in range(20)])
    worker = Worker(WorkerConfig(dsns=dsns, backoff_base_s=0.01, idle_min_s=0.005, idle_max_s=0.02, drain=True))
    assert worker.run() == 0  # it did not die on the first poison result
    assert worker.num_done == 20 and worker.num_failed == 2 * len(poison) and worker.num_lost == 0
    state = rows(dsns[0])
    assert all(state[f"ok{i}"][0] == "done" for i in range(20))
    for w in poison:
        st, attempts, errors = state[f"bad-{w}"]
        assert (st, attempts, len(errors)) == ("dead", 2, 2), (w, state[f"bad-{w}"])
        assert all("ValueError: the result of bad_result job" in e["error"] for e in errors), errors
    assert "is not JSON" in state["bad-set"][2][0]["error"]
    assert "NUL character" in state["bad-nul"][2][0]["error"]


def test_a_lost_lease_cancels_the_running_handler(make_shards, tmp_path):
    (dsn,) = make_shards(1)
    log = tmp_path / "watch"
    ShardSet([dsn]).submit([NewJob("watch_lease", {"log": str(log), "seconds": 20}, key="long")])
    worker = Worker(WorkerConfig(dsns=[dsn], lease_s=0.6, idle_min_s=0.01, idle_max_s=0.05))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT state = 'running' FROM krablet_jobs").fetchone()[0], 30,
                     "the job to start")
            taken = time.monotonic()
            # Another owner takes the job (what a reclaim after a long pause does).
            conn.execute("UPDATE krablet_jobs SET lease_owner = 'thief'")
        wait_for(log.exists, 10, "the handler to stop")
        stopped_after = time.monotonic() - taken
    finally:
        worker.stop()
        thread.join(30)
    cancelled, _ = log.read_text().split()
    assert cancelled == "True"
    assert stopped_after < 3  # a heartbeat (lease/3) plus a poll, not the handler's 20 s
    assert worker.num_lost == 1 and worker.num_done == 0  # its result was refused: not its job any more


def test_shard_writer_stops_at_its_next_encode_once_the_lease_is_lost():
    from krablet.pipeline import _StopsWhenLeaseLost

    class Latents:
        channels, downsample = 4, 8

        def encode(self, x):
            return x * 2

    ctx = JobContext("chunk", 1, "w")
    latents = _StopsWhenLeaseLost(Latents(), ctx)
    assert latents.encode(3) == 6 and latents.channels == 4 and latents.kind == "Latents"
    ctx.lease_lost.set()
    with pytest.raises(LeaseLost, match="'chunk': the lease was lost"):
        latents.encode(3)
