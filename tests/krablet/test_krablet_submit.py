"""Submitting is all or nothing across shards; --file lines are checked field by field."""

import json
import math

import psycopg
import pytest
from krablet_test_helpers import admin, db_name

from krablet import cli
from krablet.queue import NewJob
from krablet.shards import ShardSet, shard_of


def live_and_done(dsns) -> int:
    total = 0
    for dsn in dsns:
        with psycopg.connect(dsn) as conn:
            total += conn.execute("SELECT count(*) FROM krablet_job_states").fetchone()[0]
    return total


def keys_on(shard: int, prefix: str, n: int) -> list[str]:
    return [k for k in (f"{prefix}{i}" for i in range(1000)) if shard_of(k, 2) == shard][:n]


# Each is refused by PostgreSQL (or by json) only once it reaches the shard, if nobody checks first.
BAD = {
    "set": {"tags": {1, 2}},
    "bytes": {"image": b"\x89PNG"},
    "nan": {"score": math.nan},
    "nul": {"caption": "a\x00b"},
}


def test_one_bad_payload_writes_nothing_on_any_shard(make_shards):
    dsns = make_shards(2)
    # Good jobs on shard 0 (written first), the bad one on shard 1.
    good = [NewJob("noop", {"i": i}, key=k) for i, k in enumerate(keys_on(0, "good", 8))]
    (bad_key,) = keys_on(1, "bad", 1)
    for bad, payload in BAD.items():
        with pytest.raises(ValueError, match=rf"job 8 \(key '{bad_key}'\): noop: payload"):
            ShardSet(dsns).submit(good + [NewJob("noop", payload, key=bad_key)])
        assert live_and_done(dsns) == 0, bad
    # The text backslash-u-0000 is not a NUL character: stored as it is.
    assert ShardSet(dsns).submit([NewJob("noop", {"text": "\\u0000"}, key=bad_key)]) == [bad_key]
    with psycopg.connect(dsns[1]) as conn:
        assert conn.execute("SELECT payload->>'text' FROM krablet_jobs").fetchone()[0] == "\\u0000"


def test_bad_priority_and_attempts_write_nothing(make_shards):
    dsns = make_shards(2)
    good = [NewJob("noop", {}, key=k) for k in keys_on(0, "g", 5)]
    for bad, match in [(NewJob("noop", {}, key="b", priority="high"), "priority must be an integer, got str"),
                       (NewJob("noop", {}, key="b", max_attempts=0), r"max_attempts must be in \[1,"),
                       (NewJob("noop", {}, key="b", deps="okA"), "deps must be a list of keys, got str"),
                       (NewJob("noop", {}, key=7), "key must be a non-empty string, got int")]:
        with pytest.raises(ValueError, match=match):
            ShardSet(dsns).submit(good + [bad])
    assert live_and_done(dsns) == 0


def test_a_shard_refusing_its_part_rolls_back_the_others(pg, make_shards):
    dsns = make_shards(2)
    good = [NewJob("noop", {"ok": True}, key=k) for k in keys_on(0, "g", 6)]
    refused = [NewJob("noop", {"x": 1}, key=k) for k in keys_on(1, "r", 3)]
    # A server-side refusal that no client check can foresee: a constraint on shard 1 only.
    with psycopg.connect(dsns[1], autocommit=True) as conn:
        conn.execute("ALTER TABLE krablet_jobs ADD CONSTRAINT no_x CHECK (NOT payload ? 'x')")
    with pytest.raises(ValueError, match=r"shard 1 .*insert failed, nothing was written.*no_x"):
        ShardSet(dsns).submit(good + refused)
    assert live_and_done(dsns) == 0
    # A shard that cannot be reached: nothing is written on the others either.
    with admin(pg) as conn:
        conn.execute(f'ALTER DATABASE "{db_name(dsns[1])}" ALLOW_CONNECTIONS false')
    try:
        with pytest.raises(RuntimeError, match=r"shard 1 .*cannot connect"):
            ShardSet(dsns).submit(good + [NewJob("noop", {}, key=k) for k in keys_on(1, "ok", 3)])
    finally:
        with admin(pg) as conn:
            conn.execute(f'ALTER DATABASE "{db_name(dsns[1])}" ALLOW_CONNECTIONS true')
    assert live_and_done(dsns) == 0


def test_keyless_batch_resubmitted_adds_nothing_and_twins_stay_two_jobs(make_shards):
    dsns = make_shards(2)
    batch = [NewJob("noop", {"image": i % 10}) for i in range(30)]  # every payload three times
    first = ShardSet(dsns).submit(batch)
    assert len(first) == 30 and len(set(first)) == 30
    assert ShardSet(dsns).submit(batch) == []  # a retry after any failure is exact
    assert live_and_done(dsns) == 30
    # A changed batch keeps the keys of the jobs that did not change.
    assert len(ShardSet(dsns).submit(batch + [NewJob("noop", {"image": 99})])) == 1


def submit_file(dsns, tmp_path, lines, capsys) -> tuple[int, str]:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rc = cli.main(["--dsn", dsns[0], "--dsn", dsns[1], "submit", "--file", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


BAD_LINES = [
    ({"kind": "noop", "key": "b", "deps": "okA"}, "field 'deps' must be a list of keys (strings), got str \"okA\""),
    ({"kind": "noop", "key": 7}, "field 'key' must be a non-empty string, got int 7"),
    ({"kind": "noop", "key": "b", "priority": "high"}, "field 'priority' must be an integer, got str"),
    ({"kind": "noop", "key": "b", "max_attempts": True}, "field 'max_attempts' must be an integer >= 1, got bool"),
    ({"kind": "noop", "key": "b", "payload": [1]}, "field 'payload' must be an object, got list"),
    ({"kind": "noop", "key": "b", "dep": ["a"]}, "unknown field 'dep'"),
    ({"kind": "sleep", "key": "b", "payload": {"seconds": "x"}}, "sleep: malformed payload"),
    ({"kind": "noop", "key": "b", "payload": {"x": float("nan")}}, "payload is not JSON"),
]


def test_file_fields_are_checked_with_their_line_number(make_shards, tmp_path, capsys):
    dsns = make_shards(2)
    for bad_line, message in BAD_LINES:
        lines = [{"kind": "noop", "key": "a", "payload": {}}, bad_line, {"kind": "noop", "key": "c"}]
        rc, out = submit_file(dsns, tmp_path, lines, capsys)
        assert rc == 2, out
        assert f"jobs.jsonl:2: {message}" in out, out
        assert "Traceback" not in out
        assert live_and_done(dsns) == 0, bad_line


def test_file_with_good_fields_is_submitted(make_shards, tmp_path, capsys):
    dsns = make_shards(2)
    lines = [{"kind": "noop", "key": "a"}, {"kind": "noop", "key": "b", "deps": ["a"], "priority": 3}]
    rc, out = submit_file(dsns, tmp_path, lines, capsys)
    assert rc == 0 and "submitted 2 new jobs" in out, out
    with psycopg.connect(ShardSet(dsns).for_key("b").dsn.reveal()) as conn:
        assert conn.execute("SELECT state, deps, priority FROM krablet_jobs WHERE key = 'b'").fetchone() == \
            ("blocked", ["a"], 3)
