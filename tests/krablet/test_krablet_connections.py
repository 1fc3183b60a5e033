"""Connecting to shards: a wrong password is reported at once, an outage is retried
visibly, and a password never shows in a printed object or in the process arguments."""

import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from krablet_test_helpers import HERE, ROOT, admin, db_name

from krablet import cli
from krablet.queue import NewJob
from krablet.shards import ShardSet
from krablet.worker import Worker, WorkerConfig

USER, PASSWORD = "krablet_pw", "s3cr3t-pw"


@pytest.fixture(scope="module")
def password_dsn(pg):
    """dsn(database, password) -> a DSN of role krablet_pw, which must give its password (scram)."""
    with admin(pg) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {USER}")
        conn.execute(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        hba = conn.execute("SHOW hba_file").fetchone()[0]
        with open(hba) as f:
            original = f.read()
        with open(hba, "w") as f:
            f.write(f"local all {USER} scram-sha-256\nhost all {USER} 0.0.0.0/0 scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")

    def dsn(database: str, password: str | None = None) -> str:
        base = pg.dsn(database)  # postgresql://postgres:@/db?host=...
        return base.replace("postgres:@", f"{USER}:{password}@" if password is not None else f"{USER}@")

    yield dsn
    with open(hba, "w") as f:
        f.write(original)
    with admin(pg) as conn:
        conn.execute("SELECT pg_reload_conf()")


def krablet(env_dsns: str, *args: str, timeout: float = 60) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), PYTHONUNBUFFERED="1", KRABLET_DSNS=env_dsns)
    proc = subprocess.run([sys.executable, "-m", "krablet", "--kinds", "krablet_test_kinds", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_wrong_password_is_reported_at_once_and_exits_non_zero(make_shards, password_dsn, capsys, monkeypatch):
    (dsn,) = make_shards(1)
    wrong = password_dsn(db_name(dsn), "not-the-password")
    for command in ("drain", "worker"):
        rc, out = krablet(wrong, command, timeout=30)  # today's main: silent, never exits
        assert rc == 2, (command, out)
        assert f'password authentication failed for user "{USER}"' in out, out
        assert f"{USER}:***@" in out and "not-the-password" not in out, out
    monkeypatch.setenv("KRABLET_DSNS", wrong)
    assert cli.main(["status"]) == 1
    out = capsys.readouterr().out
    assert "DOWN: OperationalError" in out and "password authentication failed" in out, out
    assert "retrying will not help" in out and "not-the-password" not in out


def test_an_unreachable_shard_is_retried_with_a_message_then_drained(pg, make_shards, caplog):
    (dsn,) = make_shards(1)
    ShardSet([dsn]).submit([NewJob("noop", {}, key=f"k{i}") for i in range(10)])
    with admin(pg) as conn:
        conn.execute(f'ALTER DATABASE "{db_name(dsn)}" ALLOW_CONNECTIONS false')
    worker = Worker(WorkerConfig(dsns=[dsn], drain=True, idle_min_s=0.01, idle_max_s=0.05))
    thread = threading.Thread(target=worker.run)
    with caplog.at_level("WARNING", logger="krablet"):
        thread.start()
        try:
            time.sleep(1.5)
            assert thread.is_alive()  # a transient error: it keeps trying
        finally:
            with admin(pg) as conn:
                conn.execute(f'ALTER DATABASE "{db_name(dsn)}" ALLOW_CONNECTIONS true')
        thread.join(30)
    assert not thread.is_alive() and worker.num_done == 10
    text = caplog.text
    assert "unreachable (" in text and "), retrying" in text and "is not currently accepting connections" in text, text


def test_no_password_in_printable_objects():
    secret = "postgresql://krab:s3cr3t@db1:5432/jobs"
    config = WorkerConfig(dsns=[secret, "host=db2 user=krab password=s3cr3t dbname=jobs"])
    worker = Worker(config)  # connects lazily: nothing to reach here
    for printed in (repr(config), str(config), repr(worker.shards.shards), repr(config.dsns[0])):
        assert "s3cr3t" not in printed, printed
    assert "krab:***@db1" in repr(config)
    assert config.dsns[0].reveal() == secret


def test_dsn_with_password_refused_in_arguments_accepted_from_file_and_passfile(make_shards, password_dsn,
                                                                                 tmp_path, capsys, monkeypatch):
    (dsn,) = make_shards(1)
    good = password_dsn(db_name(dsn), PASSWORD)
    monkeypatch.delenv("KRABLET_DSNS", raising=False)
    assert cli.main(["--dsn", good, "status"]) == 2
    err = capsys.readouterr().err
    assert "visible to every user in ps" in err and PASSWORD not in err, err
    # The same DSN from a file (or KRABLET_DSNS) works.
    dsn_file = tmp_path / "dsns"
    dsn_file.write_text(f"# shard 0\n{good}\n")
    assert cli.main(["--dsn-file", str(dsn_file), "status"]) == 0, capsys.readouterr()
    assert PASSWORD not in capsys.readouterr().out
    # libpq's passfile: the DSN names no password at all.
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{USER}:{PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    assert cli.main(["--dsn", password_dsn(db_name(dsn)), "status"]) == 0, capsys.readouterr()
    with psycopg.connect(password_dsn(db_name(dsn))) as conn:  # the passfile, not trust, let it in
        assert conn.info.user == USER
