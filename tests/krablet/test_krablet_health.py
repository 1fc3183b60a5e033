"""What keeps throughput up over time: the embedded server's guards, and status warnings."""

import time

import psycopg

from krablet import cli
from krablet.embedded import QUEUE_SETTINGS
from krablet.queue import NewJob
from krablet.shards import ShardSet


def test_embedded_server_sets_queue_guards_for_every_session(pg):
    # A plain session (not Krablet's, which sets its own): the server-wide values apply.
    with psycopg.connect(pg.dsn("postgres")) as conn:
        for name in ("idle_in_transaction_session_timeout", "statement_timeout", "autovacuum_naptime"):
            assert conn.execute(f"SHOW {name}").fetchone()[0] == QUEUE_SETTINGS[name], name
    assert QUEUE_SETTINGS["idle_in_transaction_session_timeout"] == "30s"


def test_status_warns_about_an_idle_transaction_and_dead_rows(make_shards, capsys):
    (dsn,) = make_shards(1)
    ShardSet([dsn]).submit([NewJob("noop", {}, key=f"k{i}") for i in range(300)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM krablet_jobs")  # 300 dead rows, 0 live
        conn.execute("SELECT pg_stat_force_next_flush()")
    report = psycopg.connect(dsn)  # a report query left open in REPEATABLE READ
    report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    report.execute("SELECT count(*) FROM krablet_jobs").fetchone()
    pid = report.info.backend_pid
    try:
        time.sleep(1.2)
        assert cli.main(["--dsn", dsn, "status", "--warn-idle", "1", "--warn-dead-rows", "100"]) == 0
        out = capsys.readouterr().out
    finally:
        report.close()
    assert f"session pid {pid}" in out and "idle in transaction for 1s" in out, out
    assert "vacuum cannot remove dead rows while it lasts" in out
    assert "krablet_jobs holds 300 dead rows against 0 live" in out, out
    # Without the idle session and with default thresholds: no warning.
    assert cli.main(["--dsn", dsn, "status"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_status_of_a_shard_without_schema_says_to_run_init(pg, capsys):
    dsn = pg.create_database("no_schema_yet")
    assert cli.main(["--dsn", dsn, "status"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: UndefinedTable" in out and "run `python -m krablet init`" in out, out
    assert "retrying will not help" not in out
