"""Claim/complete/fail semantics of one shard, in-process, against a real PostgreSQL."""

import time

import psycopg
import pytest

import krablet_test_kinds  # noqa: F401  (registers the "tally" kind)
from krablet.queue import NewJob, ShardQueue, connect, insert_jobs
from krablet.schema import migrate
from krablet.shards import ShardSet, mask_dsn, shard_of
from krablet.worker import Worker, WorkerConfig


def job_row(dsn, key):
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM krablet_job_states WHERE key = %s", (key,))
        names = [d.name for d in cur.description]
        row = cur.fetchone()
        return dict(zip(names, row)) if row else None


def test_migrate_is_versioned_and_idempotent(make_shards):
    (dsn,) = make_shards(1)
    assert migrate(dsn) == 5  # second run: nothing to do
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT array_agg(version) FROM krablet_schema_version").fetchone()[0] == [1, 2, 3, 4, 5]


def test_malformed_payload_rejected_at_submit_and_nothing_written(make_shards):
    dsns = make_shards(2)
    shards = ShardSet(dsns)
    good = NewJob("sleep", {"seconds": 0.1}, key="good")
    with pytest.raises(ValueError, match=r"sleep: malformed payload.*'seconds' must be int or float, got str"):
        shards.submit([good, NewJob("sleep", {"seconds": "soon"}, key="bad")])
    with pytest.raises(ValueError, match="missing field 'seconds'"):
        shards.submit([NewJob("sleep", {}, key="bad2")])
    with pytest.raises(ValueError, match="unknown job kind 'nope'"):
        shards.submit([NewJob("nope", {}, key="bad3")])
    with pytest.raises(ValueError, match="payload must be a JSON object"):
        shards.submit([NewJob("noop", [1, 2], key="bad4")])
    assert all(job_row(d, "good") is None for d in dsns)  # the batch is all or nothing


def test_idempotent_resubmit(make_shards):
    dsns = make_shards(2)
    shards = ShardSet(dsns)
    jobs = [NewJob("noop", {"i": i}, key=f"k{i}") for i in range(50)]
    assert sorted(shards.submit(jobs)) == sorted(f"k{i}" for i in range(50))
    again = [NewJob("noop", {"i": -1}, key=f"k{i}") for i in range(50)] + [NewJob("noop", {}, key="new")]
    assert shards.submit(again) == ["new"]
    total = sum(sum(count_rows(d).values()) for d in dsns)
    assert total == 51
    assert job_row(shards.for_key("k3").dsn.reveal(), "k3")["payload"] == {"i": 3}  # the first submission wins
    # A key that already ran to completion (moved to the archive) is a no-op too.
    worker = Worker(WorkerConfig(dsns=dsns, drain=True, idle_min_s=0.001, idle_max_s=0.01))
    worker.run()
    assert worker.num_done == 51
    assert shards.submit(again) == []
    assert sum(count_rows(d).get("done", 0) for d in dsns) == 51 and sum(sum(count_rows(d).values()) for d in dsns) == 51


def count_rows(dsn):
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM krablet_job_states GROUP BY state").fetchall())


def test_batched_claim_takes_at_most_n_in_priority_then_age_order(make_shards):
    (dsn,) = make_shards(1)
    with connect(dsn) as conn:
        insert_jobs(conn, [NewJob("noop", {}, key=f"low{i}", priority=0) for i in range(30)])
        insert_jobs(conn, [NewJob("noop", {}, key=f"high{i}", priority=5) for i in range(5)])
        q = ShardQueue(conn)
        first = q.claim("w1", 10)
        assert [j.key for j in first] == [f"high{i}" for i in range(5)] + [f"low{i}" for i in range(5)]
        assert all(j.attempts == 1 for j in first)
        second = q.claim("w2", 100)
        assert len(second) == 25 and not {j.id for j in first} & {j.id for j in second}
        assert q.claim("w3", 10) == []


def test_claims_from_one_slot_keep_priority_strict(make_shards):
    """A claim starts in one claim slot; it still takes no job while a job of higher
    priority waits in another slot, and a slot the claim does not know is not stranded."""
    (dsn,) = make_shards(1)
    with connect(dsn) as conn:
        insert_jobs(conn, [NewJob("noop", {}, key=f"low{i}", priority=0) for i in range(400)])
        insert_jobs(conn, [NewJob("noop", {}, key=f"mid{i}", priority=3) for i in range(30)])
        insert_jobs(conn, [NewJob("noop", {}, key=f"high{i}", priority=7) for i in range(5)])
        conn.execute("UPDATE krablet_jobs SET slot = 99 WHERE key = 'low7'")  # e.g. from a larger NUM_SLOTS
        assert conn.execute("SELECT count(DISTINCT slot) FROM krablet_jobs").fetchone()[0] > 8
        q = ShardQueue(conn)
        seen = []
        for n in [3, 1, 4, 10, 20, 7]:  # 45 jobs: all highs, all mids, then lows
            seen += [j.key for j in q.claim(f"w{n}", n)]
        assert sorted(seen[:5]) == sorted(f"high{i}" for i in range(5))
        assert sorted(seen[5:35]) == sorted(f"mid{i}" for i in range(30))
        assert all(k.startswith("low") for k in seen[35:])
        rest = q.claim("w", 1000)
        assert len(rest) + len(seen) == 435 and "low7" in [j.key for j in rest] + seen


def test_zombie_completion_is_rejected(make_shards):
    (dsn,) = make_shards(1)
    with connect(dsn) as conn:
        insert_jobs(conn, [NewJob("noop", {}, key="z")])
        q = ShardQueue(conn, lease_s=0.2)
        (job,) = q.claim("zombie", 5)
        time.sleep(0.3)  # the zombie pauses past its lease
        (again,) = q.claim("rescuer", 5)
        assert again.id == job.id and again.attempts == 2
        assert q.heartbeat("zombie", [job.id]) == [job.id]  # lost
        assert q.complete("zombie", {job.id: {"by": "zombie"}}) == [job.id]  # reported lost, not applied
        assert q.fail("zombie", {job.id: "boom"}) == ([], [job.id])
        assert q.complete("rescuer", {job.id: {"by": "rescuer"}}) == []
    row = job_row(dsn, "z")
    assert row["state"] == "done" and row["result"] == {"by": "rescuer"}
    assert [e["error"] for e in row["errors"]] == ["lease expired"] and row["errors"][0]["owner"] == "zombie"


def test_failures_back_off_exponentially_then_dead_letter(make_shards):
    (dsn,) = make_shards(1)
    with connect(dsn) as conn:
        insert_jobs(conn, [NewJob("noop", {}, key="p", max_attempts=3)])
        q = ShardQueue(conn, backoff_base_s=10, backoff_cap_s=15)
        delays = []
        for attempt in (1, 2, 3):
            conn.execute("UPDATE krablet_jobs SET next_attempt_at = now()")  # skip the wait
            (job,) = q.claim("w", 1)
            assert job.attempts == attempt
            dead, lost = q.fail("w", {job.id: f"error {attempt}"})
            assert lost == []
            assert dead == ([job.id] if attempt == 3 else [])
            delays.append(conn.execute(
                "SELECT extract(epoch FROM next_attempt_at - updated_at) FROM krablet_jobs").fetchone()[0])
    assert [round(float(d)) for d in delays[:2]] == [10, 15]  # base * 2^(k-1), capped at 15
    row = job_row(dsn, "p")
    assert row["state"] == "dead" and row["attempts"] == 3
    assert [e["error"] for e in row["errors"]] == ["error 1", "error 2", "error 3"]


def test_poison_job_is_dead_lettered_by_a_worker(make_shards):
    dsns = make_shards(1)
    ShardSet(dsns).submit([NewJob("fail", {"message": "corrupt image"}, key="poison", max_attempts=3),
                           NewJob("noop", {}, key="fine")])
    Worker(WorkerConfig(dsns=dsns, backoff_base_s=0.01, idle_min_s=0.005, idle_max_s=0.02, drain=True)).run()
    row = job_row(dsns[0], "poison")
    assert row["state"] == "dead" and row["attempts"] == 3 and row["result"] is None
    assert len(row["errors"]) == 3
    assert all("RuntimeError: corrupt image" in e["error"] for e in row["errors"])
    assert job_row(dsns[0], "fine")["state"] == "done"
    with connect(dsns[0]) as conn:
        assert ShardQueue(conn).retry_dead() == 1
    assert job_row(dsns[0], "poison")["state"] == "pending"


def test_reclaimed_job_past_max_attempts_goes_dead(make_shards):
    (dsn,) = make_shards(1)
    with connect(dsn) as conn:
        insert_jobs(conn, [NewJob("noop", {}, key="crasher", max_attempts=1)])
        q = ShardQueue(conn, lease_s=0.1)
        assert len(q.claim("w1", 1)) == 1
        time.sleep(0.2)  # w1 "crashed": its lease expires
        assert q.claim("w2", 1) == []  # not handed out again: it used its only attempt
    row = job_row(dsn, "crasher")
    assert row["state"] == "dead" and row["errors"][0]["error"] == "lease expired"


def test_release_does_not_count_an_attempt(make_shards):
    (dsn,) = make_shards(1)
    with connect(dsn) as conn:
        insert_jobs(conn, [NewJob("noop", {}, key=f"r{i}") for i in range(3)])
        q = ShardQueue(conn)
        jobs = q.claim("w", 3)
        assert sorted(q.release("w", [j.id for j in jobs])) == sorted(j.id for j in jobs)
        assert [j.attempts for j in q.claim("w2", 3)] == [1, 1, 1]


def test_cross_shard_dependencies(make_shards):
    dsns = make_shards(2)
    # Pick keys that land on different shards.
    up = next(f"up{i}" for i in range(100) if shard_of(f"up{i}", 2) == 0)
    down = next(f"down{i}" for i in range(100) if shard_of(f"down{i}", 2) == 1)
    shards = ShardSet(dsns)
    shards.submit([NewJob("noop", {}, key=down, deps=(up,)), NewJob("noop", {}, key="orphan", deps=("missing",))])
    assert job_row(dsns[1], down)["state"] == "blocked"
    assert shards.promote() == 0  # its dep does not exist yet
    shards.submit([NewJob("noop", {}, key=up)])
    Worker(WorkerConfig(dsns=dsns, idle_min_s=0.005, idle_max_s=0.02, drain=True)).run()
    a, b = job_row(dsns[0], up), job_row(dsns[1], down)
    assert a["state"] == b["state"] == "done" and a["finished_at"] < b["finished_at"]
    assert job_row(shards.for_key("orphan").dsn.reveal(), "orphan")["state"] == "blocked"


def test_routing_is_stable_and_spread():
    assert shard_of("image-000042", 4) == shard_of("image-000042", 4)
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[shard_of(f"image-{i:06d}", 4)] += 1
    assert min(counts) > 800


def test_mask_dsn_hides_passwords():
    assert mask_dsn("postgresql://krab:s3cr3t@db1:5432/jobs") == "postgresql://krab:***@db1:5432/jobs"
    assert mask_dsn("host=db1 user=krab password=s3cr3t dbname=jobs") == "host=db1 user=krab password=*** dbname=jobs"
    assert mask_dsn("postgresql://krab@db1/jobs") == "postgresql://krab@db1/jobs"
    assert "s3cr3t" not in mask_dsn("postgresql://krab:s3cr3t@db1/jobs?password=s3cr3t")


def test_a_shard_with_an_older_schema_is_refused_with_the_command_that_fixes_it(make_shards):
    from krablet.dsn import PermanentConnectionError
    from krablet.shards import Shard

    (dsn,) = make_shards(1)
    with psycopg.connect(dsn, autocommit=True) as conn:  # as a shard created by the previous release
        insert_jobs(conn, [NewJob("noop", {}, key=f"old{i}") for i in range(3)])
        conn.execute("ALTER TABLE krablet_jobs DROP COLUMN slot")  # and its index
        conn.execute("DELETE FROM krablet_schema_version WHERE version = 5")
    with pytest.raises(PermanentConnectionError, match=r"schema version 4, this Krablet needs 5: run `python -m krablet init`"):
        Shard(0, dsn).queue()
    assert migrate(dsn) == 5
    assert Shard(0, dsn).queue() is not None
    with connect(dsn) as conn:  # jobs queued before the migration are claimed as before
        assert sorted(j.key for j in ShardQueue(conn).claim("w", 10)) == ["old0", "old1", "old2"]


def test_completion_looks_jobs_up_by_key_not_through_every_running_job(make_shards):
    """16 workers hold 100 jobs each; one completes its batch. Statistics were taken
    while every job was pending (as after a bulk submit), which made the planner read
    all 1,600 running rows through the lease index and keep this owner's."""
    from krablet.queue import _COMPLETE, _complete_params

    (dsn,) = make_shards(1)
    shards = ShardSet([dsn])
    shards.submit([NewJob("noop", {}, key=f"j{i}") for i in range(2000)])
    with connect(dsn) as conn:
        conn.execute("ANALYZE krablet_jobs")
        q = ShardQueue(conn)
        for w in range(16):
            jobs = q.claim(f"w{w}", 100)
        outcomes = _complete_params("w15", {j.id: "null" for j in jobs})
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + _COMPLETE, outcomes))
        assert "Index Scan using krablet_jobs_pkey on krablet_jobs j" in plan, plan
        assert "Rows Removed by Filter: 1500" not in plan, plan
        # The statement ran inside the explain (and committed): all 100 archived, none lost.
        assert q.complete_json("w15", {}) == []
        assert count_rows(dsn)["done"] == 100
