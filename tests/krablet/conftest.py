"""One embedded PostgreSQL for the whole session; fresh databases per test."""

import itertools
import logging

import psycopg
import pytest

from krablet.embedded import EmbeddedPostgres
from krablet.schema import migrate

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), num_shards=0)
    server.start()
    # Tests check semantics, not durability: skip fsyncs (creating a database per test fsyncs a lot).
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        conn.execute("SELECT pg_reload_conf()")
    yield server
    server.stop()


@pytest.fixture
def make_shards(pg):
    """make_shards(n) -> n DSNs of new, migrated databases."""

    def make(n: int = 1) -> list[str]:
        test = next(_counter)
        dsns = [pg.create_database(f"t{test}_s{i}") for i in range(n)]
        for dsn in dsns:
            migrate(dsn)
        return dsns

    return make
