"""Claim, heartbeat, complete, fail and release on one shard (psycopg 3).

Every call is one short autocommit statement: no transaction is held open
across a handler (an idle transaction blocks vacuum and cut throughput from
35k to 12k jobs/s in the measurements in DESIGN.md), and the connection sets
``idle_in_transaction_session_timeout`` as a backstop.

Ownership is the lease: every write after the claim says
``WHERE lease_owner = me AND state = 'running'``, so a worker that paused past
its lease (a zombie) and lost the job to another worker changes nothing, and
the ids it did not get back are reported as lost.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg

from krablet.dsn import Dsn, reveal
from krablet.kinds import validate_payload

INT4_MAX = 2**31 - 1
KEY_MAX_BYTES = 2000  # a btree entry must fit in a third of a page (2704 bytes)


def connect(dsn: str | Dsn, *, idle_timeout_ms: int = 10_000, statement_timeout_ms: int = 0,
            connect_timeout: int = 5, autocommit: bool = True) -> psycopg.Connection:
    options = f"-c idle_in_transaction_session_timeout={idle_timeout_ms}"
    if statement_timeout_ms:
        options += f" -c statement_timeout={statement_timeout_ms}"
    return psycopg.connect(reveal(dsn), autocommit=autocommit, connect_timeout=connect_timeout,
                           application_name="krablet", options=options)


# \u0000 as an escape, not as the text "\u0000" (an escaped backslash, then u0000).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


_ENCODE = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode


def to_json(value: Any, what: str) -> str:
    """``value`` as the JSON text PostgreSQL's jsonb will accept, or ValueError naming ``what``.

    Refused: what json cannot encode (sets, bytes, objects), NaN and infinities (not
    JSON, though Python writes them), NUL characters and lone surrogates (jsonb
    cannot store them)."""
    if value is None:  # most handlers' result
        return "null"
    try:
        text = _ENCODE(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{what} is not JSON: nested too deeply (or refers to itself)") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ValueError(f"{what} holds a NUL character (\\u0000), which PostgreSQL cannot store")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate ({e.object[e.start:e.end]!r}), which is not UTF-8") from None
    return text


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    kind: str
    payload: dict
    attempts: int
    max_attempts: int


@dataclass(frozen=True)
class NewJob:
    kind: str
    payload: dict
    key: str | None = None
    priority: int = 0
    max_attempts: int = 5
    deps: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedJob:
    """A NewJob checked field by field, its payload already JSON text: what insert writes."""

    key: str
    kind: str
    payload_json: str
    priority: int
    max_attempts: int
    deps: tuple[str, ...]


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty string, got {type(key).__name__} {key!r}")
    if "\x00" in key:
        raise ValueError(f"{what} holds a NUL character, which PostgreSQL cannot store")
    if len(key.encode("utf-8", "surrogatepass")) > KEY_MAX_BYTES:
        raise ValueError(f"{what} is longer than {KEY_MAX_BYTES} bytes")
    return key


def _check_int(value: Any, what: str, lo: int) -> int:
    # bool is an int subclass in Python, but `true` is not a priority.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= INT4_MAX:
        raise ValueError(f"{what} must be in [{lo}, {INT4_MAX}], got {value}")
    return value


def prepare_jobs(new_jobs: list[NewJob]) -> list[PreparedJob]:
    """Check every field of every job and serialise its payload, before any shard is touched.

    A job without a key gets one derived from what it is (kind, payload, priority,
    attempts, deps) and how many identical jobs precede it in the batch: submitting
    the same batch again (after an error, or a crash between two shards' commits)
    adds exactly what is missing. Raises ValueError naming the job's position."""
    prepared, seen = [], {}
    for n, job in enumerate(new_jobs):
        where = f"job {n}" + (f" (key {job.key!r})" if isinstance(job.key, str) else "")
        if not isinstance(job.kind, str):
            raise ValueError(f"{where}: kind must be a string, got {type(job.kind).__name__}")
        try:
            validate_payload(job.kind, job.payload)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        payload_json = to_json(job.payload, f"{where}: {job.kind}: payload")
        priority = _check_int(job.priority, f"{where}: priority", -INT4_MAX - 1)
        max_attempts = _check_int(job.max_attempts, f"{where}: max_attempts", 1)
        if isinstance(job.deps, (str, bytes)) or not isinstance(job.deps, (tuple, list)):
            raise ValueError(f"{where}: deps must be a list of keys, got {type(job.deps).__name__} {job.deps!r}")
        deps = tuple(_check_key(d, f"{where}: dependency") for d in job.deps)
        if job.key is None:
            spec = json.dumps([job.kind, payload_json, priority, max_attempts, deps])
            count = seen[spec] = seen.get(spec, -1) + 1
            key = "auto-" + hashlib.blake2b(f"{spec}#{count}".encode(), digest_size=16).hexdigest()
        else:
            key = _check_key(job.key, f"{where}: key")
        prepared.append(PreparedJob(key, job.kind, payload_json, priority, max_attempts, deps))
    return prepared


NUM_SLOTS = 16  # claim slots (schema 5): each pending job is in one, chosen at random on insert

# A claim takes running jobs whose lease expired first, then pending jobs (priority,
# then age). A reclaimed job that already used all its attempts goes to 'dead' (its
# worker died every time: a job that crashes workers is poison too).
#
# Pending jobs are spread over NUM_SLOTS slots (the column `slot`, random at insert),
# and a claim takes the oldest jobs of one slot, picked at random, then of the next
# slots while it has fewer than it wants, and only then the oldest of all (also the
# way to jobs of a slot number it does not know). Concurrent claims that all read the
# head of one index step over each other's locked rows and the entries of rows
# claimed moments before (dead, but not yet removable while other claims are in
# flight): at 16 workers 31 index entries read and 8 rows fetched per job taken,
# 6-11 and 1.6 with slots. Priority stays strict: a slot's jobs are taken only at the
# highest priority any runnable pending job has (checked with one descent of the
# priority index, which reads no entry when all jobs share a priority); age order
# holds within a slot, and across slots to within a few batches.
#
# Rows are locked (FOR UPDATE SKIP LOCKED) first, then updated by tuple id (ctid): a
# row this transaction holds FOR UPDATE cannot be updated or moved by anyone else, so
# its ctid is stable until commit; the TID scan skips one index descent per job, and
# at 16 workers took the claim from 36k to 40k jobs/s. Each pick has its own LIMIT
# (`WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` can update more than n
# rows: PostgreSQL bug #15715). The batch comes back as one JSON document, in claim
# order (priority, then age), without the jobs that went dead: one value to decode
# instead of a row and a payload per job.
_CLAIM = """
picked := ARRAY(SELECT ctid FROM krablet_jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at LIMIT p_n FOR UPDATE SKIP LOCKED);
FOR i IN 0 .. %(slots)d - 1 LOOP
    EXIT WHEN cardinality(picked) >= p_n;
    SELECT priority INTO top FROM krablet_jobs
    WHERE state = 'pending' AND slot = mod(first_slot + i, %(slots)d) AND next_attempt_at <= now()
    ORDER BY priority DESC, id LIMIT 1;
    CONTINUE WHEN top IS NULL;
    -- Written as ordered scans with a limit, so that no plan reads the table or the
    -- primary key instead (one whose order also fits once the priority is fixed).
    -- Rows this claim locked in an earlier slot are still pending here: a slot whose
    -- top priority is below theirs ends the loop too.
    SELECT priority INTO higher FROM krablet_jobs
    WHERE state = 'pending' AND priority > top AND next_attempt_at <= now()
    ORDER BY priority DESC, id LIMIT 1;
    EXIT WHEN higher IS NOT NULL;
    picked := picked || ARRAY(SELECT ctid FROM krablet_jobs
        WHERE state = 'pending' AND slot = mod(first_slot + i, %(slots)d) AND priority >= top
          AND next_attempt_at <= now()
        ORDER BY priority DESC, id LIMIT p_n - cardinality(picked) FOR UPDATE SKIP LOCKED);
END LOOP;
IF cardinality(picked) < p_n THEN
    -- Rows locked above are still pending in this statement's snapshot, and a lock
    -- this transaction holds does not skip them: leave them out by tuple id.
    picked := picked || ARRAY(SELECT ctid FROM krablet_jobs
        WHERE state = 'pending' AND next_attempt_at <= now() AND ctid <> ALL(picked)
        ORDER BY priority DESC, id LIMIT p_n - cardinality(picked) FOR UPDATE SKIP LOCKED);
END IF;
IF cardinality(picked) > 0 THEN
    WITH claimed AS (
        UPDATE krablet_jobs j SET
            state = CASE WHEN j.state = 'running' AND j.attempts >= j.max_attempts THEN 'dead' ELSE 'running' END,
            errors = CASE WHEN j.state = 'running'
                THEN j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', j.attempts, 'error', 'lease expired', 'owner', j.lease_owner, 'at', now()))
                ELSE j.errors END,
            finished_at = CASE WHEN j.state = 'running' AND j.attempts >= j.max_attempts THEN now() END,
            attempts = CASE WHEN j.state = 'running' AND j.attempts >= j.max_attempts
                THEN j.attempts ELSE j.attempts + 1 END,
            lease_owner = p_owner,
            lease_expires_at = now() + make_interval(secs => p_lease),
            updated_at = now()
        WHERE j.ctid = ANY(picked)
        RETURNING j.id, j.key, j.kind, j.payload, j.attempts, j.max_attempts, j.state, j.priority
    )
    SELECT json_agg(json_build_array(id, key, kind, payload, attempts, max_attempts) ORDER BY priority DESC, id)
        FILTER (WHERE state = 'running')
    INTO jobs FROM claimed;
END IF""" % {"slots": NUM_SLOTS}

# Success: the live row moves to the archive with its result, in one statement
# (so in one transaction): the job's effect is recorded exactly once. What comes
# back is the ids not archived (their lease was lost), as one short row.
_COMPLETE = """
WITH outcomes AS MATERIALIZED (
    SELECT (e->>0)::bigint AS id, e->1 AS result FROM jsonb_array_elements(%(outcomes)s::jsonb) e
), finished AS (
    DELETE FROM krablet_jobs j USING outcomes r
    -- Each job looked up by primary key (the id array), not by reading every running
    -- job of every worker through the lease index and keeping this owner's: with 16
    -- workers that read 1,600 rows per batch of 100. `IS TRUE` keeps the planner from
    -- matching the lease index's predicate, which it would pick from statistics taken
    -- while nothing ran.
    WHERE j.id = ANY(ARRAY(SELECT id FROM outcomes)) AND j.id = r.id AND j.lease_owner = %(owner)s
      AND (j.state = 'running') IS TRUE
    RETURNING j.key, j.id, j.kind, j.payload, j.priority, j.attempts, j.max_attempts, j.deps, j.lease_owner,
              r.result, j.errors, j.created_at
), archived AS (
    INSERT INTO krablet_jobs_done (key, id, kind, payload, priority, attempts, max_attempts, deps, owner, result,
                                   errors, created_at, finished_at)
    SELECT *, now() FROM finished
    RETURNING id
)
SELECT array_agg(id) FROM outcomes WHERE id NOT IN (SELECT id FROM archived)
"""

# Complete then claim, as two statements of one server-side function: one round trip
# and one commit per batch, and (READ COMMITTED) each statement takes its own
# snapshot, so the claim sees the completions and the claims other workers
# committed meanwhile. (One statement holding both read those rows as still
# pending and locked them one by one to find out: a tenth slower at 4 workers.
# Four round trips in a transaction cost the worker 60% more CPU per job at 16.)
# Created by schema migration 4 from the statements above, and replaced by
# every `migrate` (`python -m krablet init`), so a change to them reaches a shard
# with its next init.
SYNC_FUNCTION = """
CREATE OR REPLACE FUNCTION krablet_sync(p_outcomes jsonb, p_owner text, p_n int, p_lease float8,
                                        OUT lost bigint[], OUT jobs json)
LANGUAGE plpgsql
-- The heap is in id order, so at the default random_page_cost (4, for spinning disks)
-- the planner takes a slot's jobs through the priority index, filtering out the other
-- slots' fifteen in sixteen (through every dead entry at its head), not the slot index.
SET random_page_cost = 1.1
AS $fn$
DECLARE
    first_slot int := floor(random() * %d);
    top int;
    higher int;
    picked tid[];
BEGIN
    IF jsonb_array_length(p_outcomes) > 0 THEN
        %s;
    END IF;
    IF p_n > 0 THEN
%s;
    END IF;
END
$fn$""" % (
    NUM_SLOTS,
    _COMPLETE.strip().replace("%(outcomes)s", "p_outcomes").replace("%(owner)s", "p_owner")
    .replace("SELECT array_agg(id) FROM", "SELECT array_agg(id) INTO lost FROM"),
    "\n".join("        " + line for line in _CLAIM.strip().splitlines()))
_SYNC = "SELECT lost, jobs FROM krablet_sync(%(outcomes)s::jsonb, %(owner)s, %(n)s, %(lease)s)"

_HEARTBEAT = """
UPDATE krablet_jobs SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s AND state = 'running'
RETURNING id
"""


# Backoff: base * 2^(attempts-1), capped, so the first retry waits `base`.
_FAIL = """
UPDATE krablet_jobs j SET
    state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'pending' END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts, 'error', f.error, 'owner', j.lease_owner, 'at', now())),
    next_attempt_at = now() + make_interval(secs => least(%(base)s * power(2, j.attempts - 1), %(cap)s)),
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS f(id, error)
WHERE j.id = f.id AND j.lease_owner = %(owner)s AND j.state = 'running'
RETURNING j.id, j.state
"""

# Graceful shutdown: hand jobs back without counting the attempt.
_RELEASE = """
UPDATE krablet_jobs SET state = 'pending', attempts = attempts - 1, lease_owner = NULL,
    lease_expires_at = NULL, next_attempt_at = now(), updated_at = now()
WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s AND state = 'running'
RETURNING id
"""

# A key already live (ON CONFLICT) or already done (the archive) is a no-op.
_INSERT = """
INSERT INTO krablet_jobs (key, kind, payload, priority, max_attempts, deps, state)
SELECT k, kd, p, pr, ma, COALESCE((SELECT array_agg(x) FROM jsonb_array_elements_text(d) x), '{}'),
       CASE WHEN jsonb_array_length(d) > 0 THEN 'blocked' ELSE 'pending' END
FROM unnest(%(keys)s::text[], %(kinds)s::text[], %(payloads)s::jsonb[], %(prios)s::int[],
            %(max_attempts)s::int[], %(deps)s::jsonb[]) WITH ORDINALITY AS t(k, kd, p, pr, ma, d, ord)
WHERE NOT EXISTS (SELECT 1 FROM krablet_jobs_done WHERE key = t.k)
ORDER BY ord  -- ids (the age order of claims) follow the submission order
ON CONFLICT (key) DO NOTHING
RETURNING key
"""

# The insert's NOT EXISTS reads the statement's snapshot: a job with the same key
# that completed while the insert waited on its row lock is in the archive but was
# not seen. This second statement (a fresh snapshot) drops such duplicates before commit.
_DROP_ARCHIVED = """
DELETE FROM krablet_jobs j WHERE j.key = ANY(%(keys)s)
  AND EXISTS (SELECT 1 FROM krablet_jobs_done d WHERE d.key = j.key)
RETURNING j.key
"""


def insert_jobs(conn: psycopg.Connection, new_jobs: list[NewJob]) -> list[str]:
    """Check then insert in one transaction; returns the keys actually inserted
    (a key that already exists is a no-op: idempotent resubmit)."""
    prepared = prepare_jobs(new_jobs)
    with conn.transaction():
        return insert_prepared(conn, prepared)


def insert_prepared(conn: psycopg.Connection, jobs: list[PreparedJob]) -> list[str]:
    """The insert statements, in the caller's transaction (which commits them)."""
    if not jobs:
        return []
    rows = conn.execute(
        _INSERT,
        {
            "keys": [j.key for j in jobs],
            "kinds": [j.kind for j in jobs],
            "payloads": [j.payload_json for j in jobs],
            "prios": [j.priority for j in jobs],
            "max_attempts": [j.max_attempts for j in jobs],
            "deps": [json.dumps(j.deps) for j in jobs],
        },
    ).fetchall()
    inserted = [r[0] for r in rows]
    if inserted:
        dropped = {r[0] for r in conn.execute(_DROP_ARCHIVED, {"keys": inserted})}
        inserted = [k for k in inserted if k not in dropped]
    return inserted


def _complete_params(owner: str, results_json: dict[int, str]) -> dict:
    # The outcomes as one JSON document [[id, result], ...], joined from the texts: a
    # jsonb[] parameter would be quoted element by element in Python.
    return {"outcomes": "[" + ",".join(f"[{i},{r}]" for i, r in results_json.items()) + "]",
            "owner": owner}


def _storable_text(text: str) -> str:
    """An error message PostgreSQL text can hold: no NUL, no lone surrogate (a handler's
    exception may quote the very bytes that made it fail)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


class ShardQueue:
    """The queue operations of one shard, over one autocommit connection."""

    def __init__(self, conn: psycopg.Connection, *, lease_s: float = 30.0, backoff_base_s: float = 1.0,
                 backoff_cap_s: float = 300.0):
        self.conn = conn
        self.lease_s = lease_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s

    def sync(self, owner: str, results_json: dict[int, str], errors: dict[int, str], n: int):
        """``complete_json``, ``fail``, then ``claim`` of ``n`` (none when 0), atomically:
        one call of the shard's ``krablet_sync`` function (one round trip, one commit),
        preceded by the failures' statement in the same transaction when there are any.
        Returns (ids completed but lost, ids now dead, ids failed but lost, jobs claimed)."""
        params = _complete_params(owner, results_json) | {"n": n, "lease": self.lease_s}
        if errors:
            with self.conn.transaction():
                dead, lost_f = self.fail(owner, errors)
                lost, rows = self.conn.execute(_SYNC, params).fetchone()
        else:
            dead, lost_f = [], []
            lost, rows = self.conn.execute(_SYNC, params).fetchone()
        return sorted(lost) if lost else [], dead, lost_f, ([Job(*r) for r in rows] if rows else [])

    def claim(self, owner: str, n: int) -> list[Job]:
        return self.sync(owner, {}, {}, n)[3]

    def heartbeat(self, owner: str, ids: list[int]) -> list[int]:
        """Renew leases; returns the ids this owner lost."""
        kept = {r[0] for r in self.conn.execute(_HEARTBEAT, {"ids": ids, "owner": owner, "lease": self.lease_s})}
        return [i for i in ids if i not in kept]

    def complete(self, owner: str, results: dict[int, Any]) -> list[int]:
        """Mark jobs done in one statement; returns the ids that were lost (not owned any more).
        ValueError (nothing written) if a result is not JSON that jsonb can store."""
        return self.complete_json(owner, {i: to_json(r, f"result of job {i}") for i, r in results.items()})

    def complete_json(self, owner: str, results_json: dict[int, str]) -> list[int]:
        """``complete`` with each result already JSON text (``to_json``)."""
        if not results_json:
            return []
        return self.sync(owner, results_json, {}, 0)[0]

    def fail(self, owner: str, errors: dict[int, str]) -> tuple[list[int], list[int]]:
        """Record failed attempts; returns (ids now dead, ids lost)."""
        if not errors:
            return [], []
        ids = list(errors)
        rows = self.conn.execute(_FAIL, {
            "ids": ids, "errors": [_storable_text(errors[i]) for i in ids], "owner": owner,
            "base": self.backoff_base_s, "cap": self.backoff_cap_s}).fetchall()
        seen = {r[0] for r in rows}
        return [r[0] for r in rows if r[1] == "dead"], [i for i in ids if i not in seen]

    def release(self, owner: str, ids: list[int]) -> list[int]:
        """Give jobs back to pending without counting the attempt; returns the ids released."""
        if not ids:
            return []
        return [r[0] for r in self.conn.execute(_RELEASE, {"ids": ids, "owner": owner})]

    def retry_dead(self, kind: str | None = None) -> int:
        cur = self.conn.execute(
            "UPDATE krablet_jobs SET state = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,"
            " updated_at = now() WHERE state = 'dead' AND (%(kind)s::text IS NULL OR kind = %(kind)s)",
            {"kind": kind})
        return cur.rowcount

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self.conn.execute(
            "SELECT state, kind, count(*) FROM krablet_jobs GROUP BY state, kind"
            " UNION ALL SELECT 'done', kind, count(*) FROM krablet_jobs_done GROUP BY kind").fetchall()
        return {(s, k): c for s, k, c in rows}

    def finished_since(self, seconds: float) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM krablet_jobs_done WHERE finished_at > now() - make_interval(secs => %s)",
            (seconds,)).fetchone()[0]

    def done_keys(self, keys: list[str]) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM krablet_jobs_done WHERE key = ANY(%s)", (keys,))}

    def outstanding(self) -> int:
        """Jobs that can still run without outside help: pending (incl. backing off) or running."""
        return self.conn.execute(
            "SELECT count(*) FROM krablet_jobs WHERE state IN ('pending', 'running')").fetchone()[0]
