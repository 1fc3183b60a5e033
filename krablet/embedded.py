"""A local PostgreSQL for when no DSN is configured: one server, one database per shard.

Uses the ``pgserver`` package (a real PostgreSQL 16 in a folder, listening on
a Unix socket only, ~2-3 s to start); if it is unavailable, the system's
``/usr/lib/postgresql/*/bin`` initdb/pg_ctl (which refuse to run as root).
The data folder lives in the run directory, so jobs survive a restart.
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
        dsns = [self.dsn(self.database(i)) for i in range(self.num_shards)]
        for i in range(self.num_shards):
            self.create_database(self.database(i))
        return dsns

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
