"""Worker processes against a real PostgreSQL: exclusivity, crash recovery, shard outages."""

import collections
import signal

import psycopg
import pytest
from krablet_test_helpers import count_states, executions, krablet_proc, set_shard_reachable, wait_for

import krablet_test_kinds  # noqa: F401  (registers the "tally" kind for submit-side validation)
from krablet.queue import NewJob
from krablet.shards import ShardSet

pytestmark = pytest.mark.slow


def stop(proc, sig=signal.SIGTERM, timeout=30) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return out


def connected_workers(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'krablet'"
        ).fetchone()[0]


def test_concurrent_worker_processes_run_every_job_exactly_once(make_shards, tmp_path):
    (dsn,) = make_shards(1)
    log = str(tmp_path / "tally")
    workers = [krablet_proc([dsn], "worker", "--batch", "25", "--lease", "30") for _ in range(4)]
    try:
        # All four are polling before any work exists, so they really compete.
        wait_for(lambda: connected_workers(dsn) >= 4, 60, "4 workers connected")
        ShardSet([dsn]).submit([NewJob("tally", {"log": log, "seconds": 0.001}, key=f"j{i}") for i in range(3000)])
        wait_for(lambda: count_states(dsn).get("done") == 3000, 60, "3000 jobs done")
    finally:
        outs = [stop(w) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], outs
    starts, ends = executions(log)
    assert len(starts) == len(ends) == 3000
    assert sorted(set(ends)) == sorted(f"j{i}" for i in range(3000))  # each exactly once
    with psycopg.connect(dsn) as conn:
        owners = collections.Counter(r[0] for r in conn.execute("SELECT result->>'owner' FROM krablet_job_states"))
        attempts = conn.execute("SELECT max(attempts), count(*) FILTER (WHERE lease_owner <> result->>'owner')"
                                " FROM krablet_job_states").fetchone()
    assert len(owners) >= 2, owners  # the work really was shared
    assert attempts == (1, 0)


def test_sigkilled_worker_job_is_reclaimed_after_lease_and_completed_once(make_shards, tmp_path):
    (dsn,) = make_shards(1)
    log = str(tmp_path / "tally")
    ShardSet([dsn]).submit([NewJob("tally", {"log": log, "seconds": 2.0}, key="long")])
    victim = krablet_proc([dsn], "worker", "--lease", "1.5")
    try:
        wait_for(lambda: executions(log)[0] == ["long"], 60, "the victim to start the job")
    finally:
        stop(victim, signal.SIGKILL)
    assert count_states(dsn) == {"running": 1}
    rescuer = krablet_proc([dsn], "drain", "--lease", "1.5")
    out, _ = rescuer.communicate(timeout=60)
    assert rescuer.returncode == 0, out
    starts, ends = executions(log)
    assert starts == ["long", "long"] and ends == ["long"]
    with psycopg.connect(dsn) as conn:
        state, attempts, errors, result = conn.execute(
            "SELECT state, attempts, errors, result FROM krablet_job_states").fetchone()
    assert (state, attempts) == ("done", 2)
    assert [e["error"] for e in errors] == ["lease expired"]
    assert errors[0]["owner"].split(":")[1] == str(victim.pid)
    assert result["owner"].split(":")[1] != str(victim.pid)


def submit_tallies(dsns: list[str], log: str, n: int) -> tuple[list[str], list[int]]:
    """Submits n short tally jobs; returns their keys and how many landed on each shard."""
    shards = ShardSet(dsns)
    keys = [f"img{i}" for i in range(n)]
    shards.submit([NewJob("tally", {"log": log, "seconds": 0.004}, key=k) for k in keys])
    return keys, [sum(1 for k in keys if shards.for_key(k).index == s) for s in range(len(dsns))]


def test_shard_outage_mid_run_loses_nothing(pg, make_shards, tmp_path):
    dsns = make_shards(2)
    log = str(tmp_path / "tally")
    keys, per_shard = submit_tallies(dsns, log, 800)
    pool = krablet_proc(dsns, "worker", "--procs", "2", "--batch", "10", "--lease", "30")
    observer = psycopg.connect(dsns[1], autocommit=True)  # survives the outage, to look inside
    done_on_1 = lambda: observer.execute("SELECT count(*) FROM krablet_job_states WHERE state = 'done'").fetchone()[0]
    try:
        wait_for(lambda: done_on_1() >= 20, 60, "shard 1 work started")
        set_shard_reachable(pg, dsns[1], False, spare_pid=observer.info.backend_pid)
        stuck = done_on_1()
        # Shard 0 keeps being worked while shard 1 is down ...
        wait_for(lambda: count_states(dsns[0]).get("done") == per_shard[0], 60, "shard 0 drained")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsns[1]).close()
        # ... and nothing more happened on shard 1.
        assert done_on_1() == stuck < per_shard[1]
        set_shard_reachable(pg, dsns[1], True)
        wait_for(lambda: count_states(dsns[1]).get("done") == per_shard[1], 60, "shard 1 drained after recovery")
    finally:
        out = stop(pool)  # SIGTERM: a graceful exit
        observer.close()
    assert pool.returncode == 0, out
    assert out.count("exits:") == 2, out
    starts, ends = executions(log)
    assert set(ends) == set(keys)  # nothing lost


def test_cli_submit_rejects_malformed_and_drain_exits_when_done(make_shards, tmp_path):
    dsns = make_shards(2)
    bad = krablet_proc(dsns, "submit", "sleep", '{"seconds": "x"}')
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "malformed payload" in out
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"kind": "noop", "payload": {{"i": {i}}}, "key": "n{i}"}}\n' for i in range(40)))
    sub = krablet_proc(dsns, "submit", "--file", str(jobs))
    assert "submitted 40 new jobs" in sub.communicate(timeout=60)[0]
    drain = krablet_proc(dsns, "drain", "--procs", "2")
    out, _ = drain.communicate(timeout=60)
    assert drain.returncode == 0, out
    assert sum(count_states(d).get("done", 0) for d in dsns) == 40
    status = krablet_proc(dsns, "status")
    out, _ = status.communicate(timeout=60)
    assert "noop" in out and "done=" in out


def test_sigterm_finishes_the_current_job_and_releases_the_rest(make_shards, tmp_path):
    (dsn,) = make_shards(1)
    log = str(tmp_path / "tally")
    ShardSet([dsn]).submit([NewJob("tally", {"log": log, "seconds": 1.0}, key=f"s{i}") for i in range(5)])
    worker = krablet_proc([dsn], "worker", "--batch", "5")
    try:
        wait_for(lambda: len(executions(log)[0]) == 1, 60, "the first job to start")
    finally:
        out = stop(worker)
    assert worker.returncode == 0, out
    starts, ends = executions(log)
    assert starts == ends == ["s0"]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT state, attempts, lease_owner FROM krablet_job_states ORDER BY key").fetchall()
    assert rows[0][:2] == ("done", 1)
    assert rows[1:] == [("pending", 0, None)] * 4  # released: the attempt is not counted


def test_shard_server_stopped_and_restarted_mid_run_loses_nothing(make_shards, tmp_path):
    """Shard 1 is its own PostgreSQL server (durable commits), shut down mid-run and
    started again: workers go on with shard 0, then finish shard 1; every job is
    recorded done exactly once."""
    import tempfile

    from krablet.embedded import EmbeddedPostgres
    from krablet.schema import migrate

    (dsn0,) = make_shards(1)
    server = EmbeddedPostgres(tempfile.mkdtemp(prefix="kpg"), num_shards=1)  # short path: socket length limit
    (dsn1,) = server.start()
    migrate(dsn1)
    dsns = [dsn0, dsn1]
    log = str(tmp_path / "tally")
    keys, per_shard = submit_tallies(dsns, log, 600)
    pool = krablet_proc(dsns, "worker", "--procs", "2", "--batch", "10", "--lease", "60")
    try:
        wait_for(lambda: count_states(dsn1).get("done", 0) >= 20, 60, "shard 1 work started")
        server.stop()  # a fast shutdown: open transactions roll back, connections drop
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn1, connect_timeout=2).close()
        wait_for(lambda: count_states(dsn0).get("done") == per_shard[0], 60, "shard 0 drained while 1 is down")
        server.start()
        wait_for(lambda: count_states(dsn1).get("done") == per_shard[1], 90, "shard 1 drained after restart")
    finally:
        out = stop(pool)
        server.stop()
    assert pool.returncode == 0, out
    assert "shard 1 unreachable" in out
    starts, ends = executions(log)
    assert set(ends) == set(keys)  # nothing lost
    # Outcomes buffered during the outage were written once it was back: no job ran twice.
    assert len(ends) == len(keys), collections.Counter(ends).most_common(3)
