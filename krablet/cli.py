"""``python -m krablet {init,submit,worker,drain,status,retry}``.

Shards come from ``--dsn`` (repeatable), else ``KRABLET_DSNS`` (comma-separated),
else an embedded PostgreSQL in ``--run-dir`` with ``--shards`` databases.
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

from krablet.embedded import EmbeddedPostgres
from krablet.kinds import import_kinds
from krablet.queue import NewJob, ShardQueue, connect
from krablet.schema import migrate
from krablet.shards import ShardSet, mask_dsn
from krablet.worker import WorkerConfig, run_pool


@contextlib.contextmanager
def shard_dsns(args):
    dsns = args.dsn or [d.strip() for d in os.environ.get("KRABLET_DSNS", "").split(",") if d.strip()]
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
                kind = spec.get("kind", args.kind)
                if kind is None:
                    raise ValueError(f"{args.file}:{n}: no 'kind' and no KIND argument")
                jobs.append(NewJob(kind, spec.get("payload", {}), spec.get("key"), spec.get("priority", args.priority),
                                   spec.get("max_attempts", args.max_attempts), tuple(spec.get("deps", deps))))
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
        print(f"rejected: {e}", file=sys.stderr)
        return 2
    print(f"submitted {len(inserted)} new jobs ({len(jobs) - len(inserted)} already existed)")
    return 0


def _worker_config(args, dsns, drain: bool) -> WorkerConfig:
    return WorkerConfig(dsns=dsns, batch_size=args.batch, lease_s=args.lease, backoff_base_s=args.backoff,
                        drain=drain, kind_modules=args.kinds)


def cmd_worker(args, dsns) -> int:
    return run_pool(_worker_config(args, dsns, drain=args.drain), args.procs)


def cmd_drain(args, dsns) -> int:
    return run_pool(_worker_config(args, dsns, drain=True), args.procs)


def _status_once(dsns, interval: float) -> str:
    lines = []
    total_rate = 0.0
    for i, dsn in enumerate(dsns):
        try:
            with connect(dsn) as conn:
                q = ShardQueue(conn)
                counts, finished = q.counts(), q.finished_since(interval)
        except Exception as e:
            lines.append(f"shard {i} ({mask_dsn(dsn)}): DOWN ({type(e).__name__})")
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
    lines.append(f"total: {total_rate:.1f} jobs/s")
    return "\n".join(lines)


def cmd_status(args, dsns) -> int:
    while True:
        text = _status_once(dsns, args.interval)
        if not args.watch:
            print(text)
            return 0
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
    p.add_argument("--dsn", action="append", help="shard DSN (repeat per shard); default $KRABLET_DSNS")
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
    r = sub.add_parser("retry", help="move dead jobs back to pending")
    r.add_argument("--kind")
    return p


COMMANDS = {"init": cmd_init, "submit": cmd_submit, "worker": cmd_worker, "drain": cmd_drain,
            "status": cmd_status, "retry": cmd_retry}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    args = build_parser().parse_args(argv)
    with shard_dsns(args) as dsns:
        return COMMANDS[args.command](args, dsns)
