"""Routing jobs to PostgreSQL shards, shard health, and cross-shard dependencies.

Routing: a job lives on shard ``blake2b(key) mod N`` (stable across processes
and Python versions, unlike ``hash``). Changing N re-routes keys, so the shard
list of a deployment is fixed once jobs exist.

Health: a shard whose connection fails is marked down and skipped, and retried
after a jittered exponential backoff (0.5 s doubling, capped at 10 s); work
goes on on the other shards and nothing of the down shard is lost, since its
jobs are rows in its own database.

Dependencies: a job stores the *keys* it depends on (they may live on other
shards). A job submitted with deps starts in state 'blocked', which the claim
query never looks at. ``promote`` (run by idle workers and by ``drain``) reads
each shard's blocked jobs, asks the owning shard of each dep key whether it is
done (in its archive), and moves the job to 'pending' only when all are. This is correct
without distributed transactions because 'done' is terminal: once a dep was
seen done it stays done, so a promotion can never be premature. A dep that is
missing or dead leaves its dependents blocked (``status`` shows them).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import defaultdict

import psycopg

from krablet.dsn import Dsn, PermanentConnectionError, is_permanent, mask_dsn, reason
from krablet.queue import NewJob, ShardQueue, connect, insert_prepared, prepare_jobs

__all__ = ["mask_dsn", "shard_of", "Shard", "ShardSet", "SubmitIncomplete", "SHARD_DOWN_ERRORS"]

log = logging.getLogger("krablet.shards")


def shard_of(key: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % num_shards


class SubmitIncomplete(RuntimeError):
    """Some shards committed a batch and others did not (one failed between the commits).
    Submitting the same batch again adds exactly the jobs that are missing."""


class Shard:
    """One shard: a lazily opened connection, marked down on connection errors."""

    def __init__(self, index: int, dsn: str | Dsn, **queue_kw):
        self.index = index
        self.dsn = Dsn(dsn)
        self.queue_kw = queue_kw
        self._queue: ShardQueue | None = None
        self.failures = 0
        self.down_until = 0.0

    def __repr__(self) -> str:
        return f"Shard({self.index}, {mask_dsn(self.dsn)})"

    def queue(self) -> ShardQueue | None:
        """The shard's queue, or None while it is marked down."""
        if self._queue is not None and not self._queue.conn.closed:
            return self._queue
        if time.monotonic() < self.down_until:
            return None
        try:
            self._queue = ShardQueue(connect(self.dsn), **self.queue_kw)
        except psycopg.OperationalError as e:
            if is_permanent(e):
                raise PermanentConnectionError(
                    f"shard {self.index} ({mask_dsn(self.dsn)}): cannot connect: {reason(e)}") from None
            self.mark_down()
            # Once per outage, then at the capped backoff: visible, not a flood.
            if self.failures == 1 or self.failures % 10 == 0:
                log.warning("shard %d unreachable (%s), retrying (attempt %d, next in %.1fs): %s", self.index,
                            mask_dsn(self.dsn), self.failures, self.down_until - time.monotonic(), reason(e))
            return None
        self._check_schema()
        if self.failures:
            log.info("shard %d (%s) reachable again", self.index, mask_dsn(self.dsn))
        return self._queue

    def _check_schema(self) -> None:
        """A shard whose schema is older than this code (or was never created) cannot be worked."""
        from krablet.schema import SCHEMA_VERSION

        conn = self._queue.conn
        try:
            found = conn.execute("SELECT coalesce(max(version), 0) FROM krablet_schema_version").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            found = 0
        if found < SCHEMA_VERSION:
            self.close()
            raise PermanentConnectionError(
                f"shard {self.index} ({mask_dsn(self.dsn)}): schema version {found}, this Krablet needs"
                f" {SCHEMA_VERSION}: run `python -m krablet init` (it migrates in place)")

    def mark_down(self) -> None:
        if self._queue is not None:
            try:
                self._queue.conn.close()
            except Exception:
                pass
            self._queue = None
        self.failures += 1
        delay = min(0.5 * 2 ** (self.failures - 1), 10.0)
        self.down_until = time.monotonic() + delay * random.uniform(0.5, 1.0)

    def mark_up(self) -> None:
        self.failures = 0

    def close(self) -> None:
        if self._queue is not None:
            self._queue.conn.close()
            self._queue = None


# Errors that mean "this shard is unreachable right now", not "this query is wrong".
SHARD_DOWN_ERRORS = (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.InterfaceError)


class ShardSet:
    def __init__(self, dsns: list[str], **queue_kw):
        if not dsns:
            raise ValueError("no shard DSNs")
        self.shards = [Shard(i, dsn, **queue_kw) for i, dsn in enumerate(dsns)]

    def __len__(self) -> int:
        return len(self.shards)

    def for_key(self, key: str) -> Shard:
        return self.shards[shard_of(key, len(self.shards))]

    def submit(self, new_jobs: list[NewJob]) -> list[str]:
        """Submit a batch: all of it or none of it. Returns the keys that were new.

        Every job is checked and its payload serialised before any shard is
        touched (ValueError). Then each shard's group is inserted in an open
        transaction on its shard, and only once every shard holds its group are
        the transactions committed; an error before that rolls all of them back.
        A shard that fails between two commits leaves the batch partly written
        (SubmitIncomplete); since every job's key is fixed before the first write
        (keyless jobs get one derived from their content), submitting the same
        batch again adds exactly what is missing."""
        prepared = prepare_jobs(new_jobs)
        groups: dict[int, list] = defaultdict(list)
        for job in prepared:
            groups[shard_of(job.key, len(self.shards))].append(job)
        conns: dict[int, psycopg.Connection] = {}
        inserted: list[str] = []
        try:
            for index in sorted(groups):
                shard = self.shards[index]
                try:
                    # A shard's transaction waits idle while the next shards insert their parts.
                    conns[index] = connect(shard.dsn, autocommit=False, idle_timeout_ms=300_000)
                except psycopg.OperationalError as e:
                    raise _shard_error(shard, "cannot connect", e) from None
            for index in sorted(groups):
                try:
                    inserted += insert_prepared(conns[index], groups[index])
                except psycopg.Error as e:
                    raise _shard_error(self.shards[index], "insert failed, nothing was written", e) from None
            committed: list[int] = []
            for index in sorted(groups):
                try:
                    conns[index].commit()
                except psycopg.Error as e:
                    if not committed:
                        raise _shard_error(self.shards[index], "commit failed, nothing was written", e) from None
                    raise SubmitIncomplete(
                        f"shard {index} ({mask_dsn(self.shards[index].dsn)}): commit failed after shards "
                        f"{committed} committed their part ({reason(e)}); submit the same batch again to add "
                        "exactly the missing jobs") from None
                committed.append(index)
        finally:
            for conn in conns.values():
                conn.close()  # rolls back whatever did not commit
        return inserted

    def promote(self) -> int | None:
        """Move blocked jobs whose deps are all done to pending, on every shard that is up.
        Returns the number promoted, or None if some shard could not be checked."""
        promoted, complete = 0, True
        for shard in self.shards:
            q = shard.queue()
            if q is None:
                complete = False
                continue
            try:
                blocked = q.conn.execute(
                    "SELECT id, deps FROM krablet_jobs WHERE state = 'blocked' ORDER BY id LIMIT 5000").fetchall()
            except SHARD_DOWN_ERRORS:
                shard.mark_down()
                complete = False
                continue
            if not blocked:
                continue
            done, known = self._done_keys({k for _, deps in blocked for k in deps})
            ready = [i for i, deps in blocked if all(k in done for k in deps)]
            complete &= all(all(k in known for k in deps) for _, deps in blocked)
            if ready:
                try:
                    promoted += q.conn.execute(
                        "UPDATE krablet_jobs SET state = 'pending', next_attempt_at = now(), updated_at = now()"
                        " WHERE id = ANY(%s) AND state = 'blocked'", (ready,)).rowcount
                except SHARD_DOWN_ERRORS:
                    shard.mark_down()
                    complete = False
        return promoted if complete else None

    def _done_keys(self, keys: set[str]) -> tuple[set[str], set[str]]:
        """(keys that are done, keys whose shard answered)."""
        by_shard: dict[int, list[str]] = defaultdict(list)
        for k in keys:
            by_shard[shard_of(k, len(self.shards))].append(k)
        done: set[str] = set()
        known: set[str] = set()
        for index, ks in by_shard.items():
            shard = self.shards[index]
            q = shard.queue()
            if q is None:
                continue
            try:
                done |= q.done_keys(ks)
                known |= set(ks)
            except SHARD_DOWN_ERRORS:
                shard.mark_down()
        return done, known

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _shard_error(shard: Shard, what: str, error: psycopg.Error) -> Exception:
    message = f"shard {shard.index} ({mask_dsn(shard.dsn)}): {what}: {reason(error)}"
    if isinstance(error, psycopg.OperationalError) and is_permanent(error):
        return PermanentConnectionError(message)
    if isinstance(error, (psycopg.DataError, psycopg.IntegrityError)):
        return ValueError(message)
    return RuntimeError(message)
