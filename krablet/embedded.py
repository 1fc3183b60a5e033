"""A local PostgreSQL for when no DSN is configured: one server, one database per shard.

Uses the ``pgserver`` package (a real PostgreSQL 16 in a folder, listening on
a Unix socket only, ~2-3 s to start); if it is unavailable, the system's
``/usr/lib/postgresql/*/bin`` initdb/pg_ctl (which refuse to run as root).
The data folder lives in the run directory, so jobs survive a restart.

The server is set up for a queue (``QUEUE_SETTINGS``, written with ALTER SYSTEM
at every start, so an older data folder gets them too): a queue turns every
job into dead rows (claim, then complete), and throughput holds only while
vacuum keeps up, so autovacuum looks every second at full speed; and no session
may hold a snapshot (which stops vacuum for every table of the server) or run
a statement for long. A DSN-given server should set the same (README).
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger("krablet.embedded")

QUEUE_SETTINGS = {
    # A transaction left idle (a report query in psql, a crashed client's connection)
    # holds its snapshot: vacuum removes nothing newer, the claim index fills with dead
    # entries, and throughput fell to 40-50% within a minute. End such sessions.
    "idle_in_transaction_session_timeout": "30s",
    # Claims and completions take milliseconds; a submit of a million jobs a few seconds.
    "statement_timeout": "1min",
    # Dead rows appear at the rate jobs run: look for them every second, and let
    # vacuum run at full speed (the tables' own thresholds are in schema.py).
    "autovacuum_naptime": "1s",
    "autovacuum_vacuum_cost_delay": "0",
    "autovacuum_vacuum_cost_limit": "10000",
    "log_autovacuum_min_duration": "5s",
    # Fewer checkpoints (each one makes the next writes of every page a full-page image).
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


class EmbeddedPostgres:
    def __init__(self, data_dir: str | os.PathLike, num_shards: int = 1, db_prefix: str = "krablet"):
        self.data_dir = Path(data_dir)
        self.num_shards = num_shards
        self.db_prefix = db_prefix
        self._server = None  # pgserver.PostgresServer
        self._pg_ctl: str | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> list[str]:
        """Start (or attach to) the server and create the shard databases; returns their DSNs."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            import pgserver

            self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        except ImportError:
            self._start_system()
        self.apply_settings(QUEUE_SETTINGS)
        dsns = [self.dsn(self.database(i)) for i in range(self.num_shards)]
        for i in range(self.num_shards):
            self.create_database(self.database(i))
        return dsns

    def apply_settings(self, settings: dict[str, str]) -> None:
        """ALTER SYSTEM for every setting (all take effect on reload), then reload."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")

    @property
    def log_path(self) -> Path:
        """The server's log (pgserver's place, else the system pg_ctl's)."""
        return self.data_dir / ("log" if self._server is not None else "postgres.log")

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        elif self._pg_ctl is not None:
            subprocess.run([self._pg_ctl, "-D", str(self.data_dir / "pgdata"), "-m", "fast", "-w", "stop"],
                           check=True, capture_output=True)
            self._pg_ctl = None

    def __enter__(self) -> list[str]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------

    def database(self, shard: int) -> str:
        return f"{self.db_prefix}_{shard}"

    def dsn(self, database: str = "postgres") -> str:
        if self._server is not None:
            return self._server.get_uri(database)
        return f"postgresql://postgres@/{database}?host={self.data_dir}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def _start_system(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise RuntimeError("no PostgreSQL found: pip install pgserver, or set KRABLET_DSNS")
        bindir = bins[-1]
        pgdata = self.data_dir / "pgdata"
        if not (pgdata / "PG_VERSION").exists():
            subprocess.run([f"{bindir}/initdb", "-D", str(pgdata), "-U", "postgres", "--auth=trust"],
                           check=True, capture_output=True)
        self._pg_ctl = f"{bindir}/pg_ctl"
        status = subprocess.run([self._pg_ctl, "-D", str(pgdata), "status"], capture_output=True)
        if status.returncode != 0:
            subprocess.run([self._pg_ctl, "-D", str(pgdata), "-w", "-l", str(self.data_dir / "postgres.log"),
                            "-o", f"-k {self.data_dir} -c listen_addresses=''", "start"],
                           check=True, capture_output=True)
