"""``python -m krablet {init,submit,worker,drain,status,retry,lineage}``.

Shards come from ``--dsn`` (repeatable), else ``--dsn-file`` / ``KRABLET_DSN_FILE``
(one DSN per line), else ``KRABLET_DSNS`` (comma-separated), else an embedded
PostgreSQL in ``--run-dir`` with ``--shards`` databases. ``--dsn`` must not carry a
password (the process arguments are visible to every user in ``ps``): put it in
the environment, the DSN file, a libpq service file (``service=NAME``) or passfile.

Exit status: 0 done, 1 a shard is down (``status``), 2 refused input or a
connection error that retrying cannot fix (wrong password, no such database).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections import defaultdict

import psycopg

from krablet.dsn import PermanentConnectionError, has_password, is_permanent, mask_dsn, read_dsn_file, reason
from krablet.embedded import EmbeddedPostgres
from krablet.kinds import import_kinds, validate_payload
from krablet.queue import NewJob, ShardQueue, connect, to_json
from krablet.schema import migrate
from krablet.shards import ShardSet, SubmitIncomplete
from krablet.worker import WorkerConfig, run_pool


class UsageError(ValueError):
    """Bad command-line input: printed, exit status 2."""


def configured_dsns(args) -> list[str]:
    """The shard DSNs from --dsn, --dsn-file / KRABLET_DSN_FILE or KRABLET_DSNS (empty: embedded)."""
    for dsn in args.dsn or []:
        if has_password(dsn):
            raise UsageError(f"--dsn {mask_dsn(dsn)}: a password in the process arguments is visible to every "
                             "user in ps; put the DSN in KRABLET_DSNS or a --dsn-file, or the password in a "
                             "libpq passfile (~/.pgpass, PGPASSFILE) or service file (PGSERVICEFILE)")
    if args.dsn:
        return args.dsn
    path = getattr(args, "dsn_file", None) or os.environ.get("KRABLET_DSN_FILE")
    if path:
        return read_dsn_file(path)
    return [d.strip() for d in os.environ.get("KRABLET_DSNS", "").split(",") if d.strip()]


@contextlib.contextmanager
def shard_dsns(args):
    dsns = configured_dsns(args)
    if dsns:
        yield dsns
        return
    with EmbeddedPostgres(os.path.join(args.run_dir, "postgres"), args.shards) as dsns:
        logging.getLogger("krablet").info("embedded PostgreSQL: %s", ", ".join(mask_dsn(d) for d in dsns))
        yield dsns


def cmd_init(args, dsns) -> int:
    for i, dsn in enumerate(dsns):
        print(f"shard {i} ({mask_dsn(dsn)}): schema version {migrate(dsn)}")
    return 0


_FILE_FIELDS = {"kind": "a string", "payload": "an object", "key": "a non-empty string",
                "priority": "an integer", "max_attempts": "an integer >= 1", "deps": "a list of keys (strings)"}


def _field_ok(name: str, value) -> bool:
    if name in ("kind", "key"):
        return isinstance(value, str) and bool(value)
    if name == "payload":
        return isinstance(value, dict)
    if name in ("priority", "max_attempts"):
        return isinstance(value, int) and not isinstance(value, bool) and (name == "priority" or value >= 1)
    return isinstance(value, list) and all(isinstance(d, str) and d for d in value)  # deps


def _job_from_line(spec, where: str, args, deps: tuple[str, ...]) -> NewJob:
    """One --file line's job, every field's type checked; ValueError names the file and line."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a line must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_FILE_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_FILE_FIELDS)})")
    for name, value in spec.items():
        if not _field_ok(name, value):
            raise ValueError(f"{where}: field {name!r} must be {_FILE_FIELDS[name]}, "
                             f"got {type(value).__name__} {json.dumps(value)[:80]}")
    kind = spec.get("kind", args.kind)
    if kind is None:
        raise ValueError(f"{where}: no 'kind' and no KIND argument")
    payload = spec.get("payload", {})
    try:
        validate_payload(kind, payload)
        to_json(payload, "payload")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return NewJob(kind, payload, spec.get("key"), spec.get("priority", args.priority),
                  spec.get("max_attempts", args.max_attempts), tuple(spec.get("deps", deps)))


def _jobs_from_args(args) -> list[NewJob]:
    deps = tuple(d for d in (args.deps or "").split(",") if d)
    jobs = []
    if args.file:
        with open(args.file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    spec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.file}:{n}: not JSON: {e}") from None
                jobs.append(_job_from_line(spec, f"{args.file}:{n}", args, deps))
    for n, text in enumerate(args.payloads):
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"payload {text!r} is not JSON: {e}") from None
        key = args.key if args.key and len(args.payloads) == 1 else (f"{args.key}-{n}" if args.key else None)
        jobs.append(NewJob(args.kind, payload, key, args.priority, args.max_attempts, deps))
    return jobs


def cmd_submit(args, dsns) -> int:
    import_kinds(args.kinds)
    try:
        jobs = _jobs_from_args(args)
        inserted = ShardSet(dsns).submit(jobs)
    except ValueError as e:
        print(f"rejected, nothing was submitted: {e}", file=sys.stderr)
        return 2
    except SubmitIncomplete as e:
        print(f"submit incomplete: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a shard down or refusing: nothing was written
        print(f"not submitted, nothing was written: {e}", file=sys.stderr)
        return 2 if isinstance(e, PermanentConnectionError) else 1
    print(f"submitted {len(inserted)} new jobs ({len(jobs) - len(inserted)} already existed)")
    return 0


def _worker_config(args, dsns, drain: bool) -> WorkerConfig:
    return WorkerConfig(dsns=dsns, batch_size=args.batch, lease_s=args.lease, backoff_base_s=args.backoff,
                        drain=drain, kind_modules=args.kinds)


def cmd_worker(args, dsns) -> int:
    return run_pool(_worker_config(args, dsns, drain=args.drain), args.procs)


def cmd_drain(args, dsns) -> int:
    return run_pool(_worker_config(args, dsns, drain=True), args.procs)


IDLE_WARN_S = 60.0  # a transaction idle this long holds back vacuum on the whole server
DEAD_ROWS_WARN = 100_000  # dead rows in krablet_jobs past this, and more than the live ones


def _health_warnings(conn, shard: int, previous_dead: int | None, idle_warn_s: float = IDLE_WARN_S,
                     dead_rows_warn: int = DEAD_ROWS_WARN) -> tuple[list[str], int]:
    """Warnings about what slows a queue down over time: long-idle transactions and
    snapshots (vacuum cannot remove rows they may still see), and dead rows piling up."""
    warnings = []
    for pid, app, user, state, idle_s, xact_s, db in conn.execute(
            "SELECT pid, application_name, usename, state, extract(epoch FROM now() - state_change),"
            " extract(epoch FROM now() - xact_start), datname FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL"
            " AND (backend_xmin IS NOT NULL OR state LIKE 'idle in transaction%%')"
            " AND now() - xact_start > make_interval(secs => %s) ORDER BY xact_start",
            (idle_warn_s,)).fetchall():
        what = f"idle in transaction for {idle_s:.0f}s" if state and state.startswith("idle in") else \
            f"in a transaction open for {xact_s:.0f}s ({state})"
        warnings.append(f"  WARNING shard {shard}: session pid {pid} ({app or '-'}, user {user}, database {db}) "
                        f"{what}: vacuum cannot remove dead rows while it lasts; end it, or set "
                        "idle_in_transaction_session_timeout on the server")
    row = conn.execute("SELECT n_dead_tup, n_live_tup, last_autovacuum FROM pg_stat_user_tables"
                       " WHERE relname = 'krablet_jobs'").fetchone()
    dead = row[0] if row else 0
    if row and dead > dead_rows_warn and dead > row[1]:
        growth = f", +{dead - previous_dead} since the last look" if previous_dead is not None and \
            dead > previous_dead else ""
        warnings.append(f"  WARNING shard {shard}: krablet_jobs holds {dead} dead rows against {row[1]} live"
                        f"{growth} (last autovacuum {row[2] or 'never'}): claims slow down until vacuum catches up")
    return warnings, dead


def _status_once(dsns, interval: float, dead_rows: dict[int, int] | None = None, idle_warn_s: float = IDLE_WARN_S,
                 dead_rows_warn: int = DEAD_ROWS_WARN) -> tuple[str, int]:
    """The status text and how many shards are down."""
    lines = []
    total_rate = 0.0
    down = 0
    dead_rows = {} if dead_rows is None else dead_rows
    for i, dsn in enumerate(dsns):
        try:
            with connect(dsn) as conn:
                q = ShardQueue(conn)
                counts, finished = q.counts(), q.finished_since(interval)
                warnings, dead_rows[i] = _health_warnings(conn, i, dead_rows.get(i), idle_warn_s, dead_rows_warn)
        except psycopg.OperationalError as e:
            down += 1
            hint = " (retrying will not help: check the DSN and credentials)" if is_permanent(e) else ""
            lines.append(f"shard {i} ({mask_dsn(dsn)}): DOWN: {reason(e)}{hint}")
            continue
        except psycopg.Error as e:  # reachable, but not a working shard (no schema, no permission)
            down += 1
            lines.append(f"shard {i} ({mask_dsn(dsn)}): ERROR: {reason(e)}")
            continue
        rate = finished / interval
        total_rate += rate
        lines.append(f"shard {i} ({mask_dsn(dsn)}): {rate:.1f} jobs/s done over the last {interval:g}s")
        by_kind: dict[str, dict[str, int]] = defaultdict(dict)
        for (state, kind), c in counts.items():
            by_kind[kind][state] = c
        for kind in sorted(by_kind):
            states = " ".join(f"{s}={c}" for s, c in sorted(by_kind[kind].items()))
            lines.append(f"  {kind:<16} {states}")
        lines += warnings
    lines.append(f"total: {total_rate:.1f} jobs/s" + (f"; {down} of {len(dsns)} shards not working" if down else ""))
    return "\n".join(lines), down


def cmd_status(args, dsns) -> int:
    dead_rows: dict[int, int] = {}
    while True:
        text, down = _status_once(dsns, args.interval, dead_rows, args.warn_idle, args.warn_dead_rows)
        if not args.watch:
            print(text)
            return 1 if down else 0
        print("\033[2J\033[H" + time.strftime("%H:%M:%S") + "\n" + text, flush=True)
        time.sleep(args.interval)


def cmd_retry(args, dsns) -> int:
    total = 0
    for dsn in dsns:
        with connect(dsn) as conn:
            total += ShardQueue(conn).retry_dead(args.kind)
    print(f"{total} dead jobs back to pending")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krablet")
    p.add_argument("--dsn", action="append",
                   help="shard DSN without a password (repeat per shard); default --dsn-file, then $KRABLET_DSNS")
    p.add_argument("--dsn-file", help="file with one shard DSN per line; default $KRABLET_DSN_FILE")
    p.add_argument("--run-dir", default="runs/krablet", help="embedded PostgreSQL lives here when no DSN")
    p.add_argument("--shards", type=int, default=2, help="embedded: number of shard databases")
    p.add_argument("--kinds", action="append", default=[], help="module registering job kinds (repeatable)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="create or migrate the schema on every shard")
    s = sub.add_parser("submit", help="submit jobs (validated against their kind)")
    s.add_argument("kind", nargs="?")
    s.add_argument("payloads", nargs="*", help="JSON payloads")
    s.add_argument("--file", help="JSONL: one {kind, payload, key?, priority?, max_attempts?, deps?} per line")
    s.add_argument("--key", help="idempotency key (suffixed -i for several payloads)")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--max-attempts", type=int, default=5)
    s.add_argument("--deps", help="comma-separated keys that must be done first")
    for name in ("worker", "drain"):
        w = sub.add_parser(name, help="run workers" + (" until no runnable work remains" if name == "drain" else ""))
        w.add_argument("--procs", type=int, default=1)
        w.add_argument("--batch", type=int, default=100)
        w.add_argument("--lease", type=float, default=30.0)
        w.add_argument("--backoff", type=float, default=1.0, help="retry backoff base, seconds")
        if name == "worker":
            w.add_argument("--drain", action="store_true")
    st = sub.add_parser("status", help="counts per shard, kind and state; throughput")
    st.add_argument("--interval", type=float, default=10.0)
    st.add_argument("--watch", action="store_true")
    st.add_argument("--warn-idle", type=float, default=IDLE_WARN_S,
                    help="warn about transactions open (or idle in one) longer than this, seconds")
    st.add_argument("--warn-dead-rows", type=int, default=DEAD_ROWS_WARN,
                    help="warn when krablet_jobs holds more dead rows than this (and than live ones)")
    r = sub.add_parser("retry", help="move dead jobs back to pending")
    r.add_argument("--kind")
    li = sub.add_parser("lineage", help="which curation stage kept or dropped an input, with score and reason")
    li.add_argument("keys", nargs="*", help="input keys (as the pipeline named them: its source)")
    li.add_argument("--summary", action="store_true", help="per stage: items kept and dropped, by reason")
    li.add_argument("--prefix", default="", help="--summary: only items whose key starts with this")
    li.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def cmd_lineage(args, dsns) -> int:
    from dataclasses import asdict

    from krablet.lineage import format_summary, format_trail, lookup, summary

    if not args.keys and not args.summary:
        raise UsageError("lineage: name input keys, or --summary")
    for dsn in dsns:
        migrate(dsn)
    if args.summary:
        rows = summary(dsns, args.prefix)
        print(json.dumps(rows) if args.json else format_summary(rows))
    missing = 0
    for key in args.keys:
        trail = lookup(dsns, key)
        missing += not trail
        print(json.dumps({"item": key, "trail": [asdict(d) for d in trail]}) if args.json else format_trail(key, trail))
    return 1 if missing else 0


COMMANDS = {"lineage": cmd_lineage, "init": cmd_init, "submit": cmd_submit, "worker": cmd_worker, "drain": cmd_drain,
            "status": cmd_status, "retry": cmd_retry}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    args = build_parser().parse_args(argv)
    try:
        with shard_dsns(args) as dsns:
            return COMMANDS[args.command](args, dsns)
    except (UsageError, PermanentConnectionError) as e:
        print(f"krablet: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # a DSN file that cannot be read as DSNs
        print(f"krablet: {e}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as e:  # init, retry: the shard's own words, the DSN masked
        print(f"krablet: cannot reach a shard: {reason(e)}", file=sys.stderr)
        return 2 if is_permanent(e) else 1
