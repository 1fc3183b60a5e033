"""Tables, indexes and migrations of one Krablet shard (SQLAlchemy Core).

Live jobs (blocked, pending, running, dead) are rows of ``krablet_jobs``. A
job that succeeds is moved, in the statement that records its result, to the
append-only ``krablet_jobs_done``: deleting a live row and appending an
archive row costs less than rewriting a status column on an indexed table,
and keeps the live table (and its claim index) as small as the backlog.
The view ``krablet_job_states`` shows both with one ``state`` column.

Every shard holds the same schema. Migrations are an ordered list of
functions; ``krablet_schema_version`` records which ones ran, and ``migrate``
applies the missing ones under an advisory lock so that several processes
calling ``init`` at once do not race.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

STATES = ("blocked", "pending", "running", "done", "dead")  # 'done' rows live in krablet_jobs_done from v2

metadata = sa.MetaData()

jobs = sa.Table(
    "krablet_jobs",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    # Idempotency key: resubmitting the same key is a no-op. It also routes the
    # job to its shard and names it in other jobs' dependency lists.
    sa.Column("key", sa.Text, nullable=False, unique=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("state", sa.Text, nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="5"),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
    # Keys of jobs (possibly on other shards) that must be done first.
    sa.Column("deps", ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("result", JSONB),
    sa.Column("errors", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.CheckConstraint(f"state IN {STATES!r}", name="krablet_jobs_state_check"),
    sa.CheckConstraint("max_attempts >= 1", name="krablet_jobs_max_attempts_check"),
    # Partial indexes keep the claim path an index scan however many done rows pile up.
    sa.Index("krablet_jobs_pending_idx", sa.text("priority DESC"), "id", postgresql_where=sa.text("state = 'pending'")),
    sa.Index("krablet_jobs_lease_idx", "lease_expires_at", postgresql_where=sa.text("state = 'running'")),
    sa.Index("krablet_jobs_blocked_idx", "id", postgresql_where=sa.text("state = 'blocked'")),
    sa.Index("krablet_jobs_finished_idx", "finished_at", postgresql_where=sa.text("finished_at IS NOT NULL")),
    # Migration 5 adds the claim slot: a column `slot` and the index krablet_jobs_slot_idx.
)

jobs_done = sa.Table(
    "krablet_jobs_done",
    metadata,
    # The key stays unique across both tables: submit checks this one too.
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("id", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("deps", ARRAY(sa.Text), nullable=False),
    sa.Column("owner", sa.Text, nullable=False),  # the worker that completed it
    sa.Column("result", JSONB),
    sa.Column("errors", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("krablet_jobs_done_finished_idx", "finished_at"),
)

schema_version = sa.Table(
    "krablet_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


def _v1_create_tables(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[jobs])
    # A queue table churns: every job is updated 2+ times. Vacuum and analyze it far
    # more often than the 20% default, so dead rows and stale planner estimates
    # (which turn the claim's index scan into scan-everything-and-sort) do not pile up.
    conn.execute(sa.text(
        "ALTER TABLE krablet_jobs SET (autovacuum_vacuum_scale_factor = 0.02,"
        " autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0)"))


def _v2_archive_done_jobs(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[jobs_done])
    conn.execute(sa.text(
        "INSERT INTO krablet_jobs_done (key, id, kind, payload, priority, attempts, max_attempts, deps, owner,"
        " result, errors, created_at, finished_at)"
        " SELECT key, id, kind, payload, priority, attempts, max_attempts, deps, lease_owner,"
        " result, errors, created_at, finished_at FROM krablet_jobs WHERE state = 'done'"))
    conn.execute(sa.text("DELETE FROM krablet_jobs WHERE state = 'done'"))
    conn.execute(sa.text(
        "CREATE VIEW krablet_job_states AS"
        " SELECT id, key, kind, payload, priority, state, attempts, max_attempts, lease_owner, deps, result, errors,"
        " created_at, finished_at FROM krablet_jobs"
        " UNION ALL SELECT id, key, kind, payload, priority, 'done', attempts, max_attempts, owner, deps, result,"
        " errors, created_at, finished_at FROM krablet_jobs_done"))


def _v3_lineage(conn: sa.Connection) -> None:
    from krablet.lineage import CREATE

    conn.execute(sa.text(CREATE))
    conn.execute(sa.text("CREATE INDEX krablet_lineage_stage_idx ON krablet_lineage (stage, decision)"))


def _v4_sync_function(conn: sa.Connection) -> None:
    # Complete + claim as one server-side call per batch (krablet/queue.py says why).
    # `migrate` also replaces it on every run, so the function always follows the
    # statements in krablet/queue.py that it is built from.
    _replace_sync_function(conn)


def _replace_sync_function(conn: sa.Connection) -> None:
    from krablet.queue import SYNC_FUNCTION

    conn.exec_driver_sql(SYNC_FUNCTION)


def _v5_claim_slots(conn: sa.Connection) -> None:
    # Each pending job in one of NUM_SLOTS claim slots, at random, so that concurrent
    # claims start at different places of the index (krablet/queue.py says why). The
    # constant default first: jobs already queued take it without a table rewrite.
    from krablet.queue import NUM_SLOTS

    conn.execute(sa.text("ALTER TABLE krablet_jobs ADD COLUMN slot smallint NOT NULL DEFAULT 0"))
    conn.execute(sa.text(f"ALTER TABLE krablet_jobs ALTER COLUMN slot SET DEFAULT floor(random() * {NUM_SLOTS})"))
    conn.execute(sa.text(
        "CREATE INDEX krablet_jobs_slot_idx ON krablet_jobs (slot, priority DESC, id) WHERE state = 'pending'"))


MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1_create_tables, _v2_archive_done_jobs, _v3_lineage,
                                                     _v4_sync_function, _v5_claim_slots]
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_ID = 0x6B7261626C6574  # "krablet"


def engine_for(dsn: str) -> sa.Engine:
    # A creator keeps libpq's own DSN parsing (socket dirs in ?host=, keyword form).
    return sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=sa.NullPool)


def migrate(dsn: str) -> int:
    """Bring one shard to the newest schema version; returns that version."""
    engine = engine_for(dsn)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_ID})
            schema_version.create(conn, checkfirst=True)
            done = set(conn.execute(sa.select(schema_version.c.version)).scalars())
            for version, step in enumerate(MIGRATIONS, start=1):
                if version not in done:
                    step(conn)
                    conn.execute(schema_version.insert().values(version=version))
            _replace_sync_function(conn)
        return SCHEMA_VERSION
    finally:
        engine.dispose()
