"""Helpers for the Krablet tests (a module of its own: several test folders have a conftest.py)."""

import glob
import os
import subprocess
import sys
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def admin(pg) -> psycopg.Connection:
    return psycopg.connect(pg.dsn("postgres"), autocommit=True)


def db_name(dsn: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]


def set_shard_reachable(pg, dsn: str, reachable: bool, spare_pid: int = 0) -> None:
    """Simulate a shard outage: refuse new connections and cut the open ones
    (all but ``spare_pid``, a test's observer connection)."""
    name = db_name(dsn)
    with admin(pg) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
        if not reachable:
            others = "FROM pg_stat_activity WHERE datname = %s AND pid <> %s"
            conn.execute(f"SELECT pg_terminate_backend(pid) {others}", (name, spare_pid))
            # pg_terminate_backend only signals: wait until they are really gone.
            wait_for(lambda: conn.execute(f"SELECT count(*) = 0 {others}", (name, spare_pid)).fetchone()[0],
                     30, "backends of the stopped shard to exit")


def krablet_proc(dsns: list[str], *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "krablet", "--kinds", "krablet_test_kinds"]
    for dsn in dsns:
        cmd += ["--dsn", dsn]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), PYTHONUNBUFFERED="1")
    env.pop("KRABLET_DSNS", None)
    return subprocess.Popen(cmd + list(args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def executions(log: str) -> tuple[list[str], list[str]]:
    """(keys started, keys ended) over all worker processes' tally files."""
    starts, ends = [], []
    for path in glob.glob(log + ".*"):
        with open(path) as f:
            for line in f:
                event, key, _owner = line.split()
                (starts if event == "start" else ends).append(key)
    return starts, ends


def count_states(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM krablet_job_states GROUP BY state").fetchall())
