"""Krablet under chaos: workers SIGKILLed, a shard server restarted twice (once crash-style).

    python benchmarks/krablet_chaos.py [--jobs 100000] [--workers 16] [--kill-fraction 0.2]

Two shards, each its own embedded PostgreSQL server (durable commits), hold
``--jobs`` short jobs. ``--workers`` worker processes (the real
``krablet.worker.Worker`` loop) drain them while, as the work progresses,
a fifth of the workers are SIGKILLed (each replaced by a new one) and shard 1's
server is stopped and started again twice: once with a fast shutdown, once with
an immediate one (SIGQUIT to the postmaster: no checkpoint, crash recovery at
the next start). Every execution of a handler is appended to a per-process
log, so afterwards the script counts, per job key:

- lost: not done at the end;
- committed twice: more than one row for the key (live or archived, either shard);
- re-run: its handler started more than once (expected for the jobs a killed
  worker held, or whose outcome was buffered while their shard was down
  past the lease); completed twice: its handler ran to the end more than once.

Writes benchmarks/results/krablet_chaos.json (or ``--out``); exits 1 if any
job was lost or committed twice.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time

from krablet.kinds import kind, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@kind("chaos", validate=lambda p: require(p, log=str))
def chaos_job(payload, ctx):
    """Records its start and end (unbuffered appends survive a SIGKILL), sleeps a little."""
    fd = os.open(f"{payload['log']}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"start {ctx.key}\n".encode())
        time.sleep(payload.get("seconds", 0))
        os.write(fd, f"end {ctx.key}\n".encode())
    finally:
        os.close(fd)
    return {"attempt": ctx.attempt}


def _worker_proc(dsns, lease_s):
    from krablet.worker import Worker, WorkerConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = Worker(WorkerConfig(dsns=dsns, batch_size=20, lease_s=lease_s, idle_min_s=0.01, idle_max_s=0.2))
    signal.signal(signal.SIGTERM, worker.stop)
    worker.run()


def _done(dsns) -> int | None:
    import psycopg

    total = 0
    for dsn in dsns:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                total += conn.execute("SELECT count(*) FROM krablet_jobs_done").fetchone()[0]
        except psycopg.OperationalError:
            return None
    return total


def _crash(server) -> None:
    """Immediate shutdown: the postmaster gets SIGQUIT, its backends exit without a checkpoint."""
    with open(server.data_dir / "postmaster.pid") as f:
        pid = int(f.readline())
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    server.stop()  # forget the dead server (its pid file is stale)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--kill-fraction", type=float, default=0.2, help="share of the workers SIGKILLed")
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=0.001, help="each job's sleep")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "krablet_chaos.json"))
    args = parser.parse_args()
    logging.getLogger("pgserver").setLevel(logging.WARNING)

    from krablet.embedded import EmbeddedPostgres
    from krablet.queue import NewJob
    from krablet.schema import migrate
    from krablet.shards import ShardSet

    tmp = tempfile.mkdtemp(prefix="kchaos")  # short paths: a Unix socket's path is at most 107 bytes
    servers = [EmbeddedPostgres(os.path.join(tmp, f"pg{i}"), num_shards=1) for i in range(2)]
    dsns = [s.start()[0] for s in servers]
    for dsn in dsns:
        migrate(dsn)
    log = os.path.join(tmp, "runs")
    keys = [f"c{i:07d}" for i in range(args.jobs)]
    shards = ShardSet(dsns)
    for lo in range(0, len(keys), 10_000):
        shards.submit([NewJob("chaos", {"log": log, "seconds": args.seconds}, key=k) for k in keys[lo:lo + 10_000]])
    shards.close()

    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker_proc, args=(dsns, args.lease)) for _ in range(args.workers)]
    for p in workers:
        p.start()
    num_kills = max(1, round(args.workers * args.kill_fraction))
    # Events at shares of the work done: kills spread over the run, the restarts between them.
    events = sorted([(0.1 + 0.6 * i / max(1, num_kills - 1), "kill") for i in range(num_kills)]
                    + [(0.25, "restart"), (0.55, "crash")])
    log_events = []
    start = time.monotonic()
    done = 0
    while time.monotonic() - start < args.timeout:
        count = _done(dsns)
        done = count if count is not None else done
        while events and done >= events[0][0] * args.jobs:
            _, what = events.pop(0)
            t = time.monotonic() - start
            if what == "kill":
                victim = random.choice([p for p in workers if p.is_alive()])
                victim.kill()
                victim.join()
                replacement = ctx.Process(target=_worker_proc, args=(dsns, args.lease))
                replacement.start()
                workers.append(replacement)
                log_events.append({"t_s": round(t, 1), "done": done, "event": f"SIGKILL worker pid {victim.pid}"})
            else:
                if what == "restart":
                    servers[1].stop()  # fast shutdown
                else:
                    _crash(servers[1])
                time.sleep(1.0)  # down for a while: the workers go on with shard 0
                servers[1].start()
                log_events.append({"t_s": round(t, 1), "done": done,
                                   "event": f"shard 1 server {'fast' if what == 'restart' else 'immediate'}"
                                            " shutdown, started again"})
            print(f"[{t:6.1f}s] {done}/{args.jobs} done: {log_events[-1]['event']}", flush=True)
        if done >= args.jobs and not events:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    for p in workers:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in workers:
        p.join(60)

    import psycopg

    rows: collections.Counter = collections.Counter()
    done_keys: set[str] = set()
    for dsn in dsns:
        with psycopg.connect(dsn) as conn:
            for key, state in conn.execute("SELECT key, state FROM krablet_job_states"):
                rows[key] += 1
                if state == "done":
                    done_keys.add(key)
    starts: collections.Counter = collections.Counter()
    ends: collections.Counter = collections.Counter()
    for path in glob.glob(log + ".*"):
        with open(path) as f:
            for line in f:
                event, key = line.split()
                (starts if event == "start" else ends)[key] += 1
    for server in servers:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "jobs": args.jobs, "workers": args.workers, "kills": num_kills, "shard_restarts": 2,
        "seconds": round(elapsed, 1), "done": len(done_keys),
        "lost": sum(1 for k in keys if k not in done_keys),
        "committed_twice": sum(1 for k in keys if rows[k] > 1),
        "re_run": sum(1 for k in keys if starts[k] > 1),
        "completed_twice": sum(1 for k in keys if ends[k] > 1),
        "never_ran_but_done": sum(1 for k in done_keys if starts[k] == 0),
        "events": log_events,
    }
    print(f"\n{args.jobs} jobs, {args.workers} workers, {num_kills} SIGKILLed, shard 1 restarted twice "
          f"(once crash-style), {elapsed:.0f}s:")
    print(f"  lost {result['lost']}, committed twice {result['committed_twice']}, re-run {result['re_run']} "
          f"(handler completed twice: {result['completed_twice']}), done {result['done']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    raise SystemExit(1 if result["lost"] or result["committed_twice"] else 0)


if __name__ == "__main__":
    main()
