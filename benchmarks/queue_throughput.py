"""Krablet queue throughput (claim + complete of no-op jobs) beside pgqueuer, on one embedded PostgreSQL.

    python benchmarks/queue_throughput.py [--jobs 200000] [--procs 1 4 16] [--batch 100]

Durable commits (fsync and synchronous_commit on, the server defaults).
Krablet runs its real worker loop (krablet.worker.Worker in drain mode) on one
shard and on two shards (two databases of the same server); pgqueuer runs its
own Queries.enqueue / dequeue / log_jobs with the same batch size. Each worker
process starts, connects, then waits on a barrier, so process start-up is not
timed. Each run has its own database, dropped (and the server checkpointed) before
the next run starts; before the first, the new server writes (and so creates) its WAL
files once. Writes benchmarks/results/queue_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _krablet_proc(dsns, batch, ready, go, out):
    from krablet.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(dsns=dsns, batch_size=batch, drain=True, idle_min_s=0.001, idle_max_s=0.01))
    for shard in worker.shards.shards:
        shard.queue()  # connect before the clock starts
    ready.put(1)
    go.wait()
    worker.run()
    out.put(worker.num_done)


def _pgqueuer_proc(dsn, batch, ready, go, out):
    asyncio.run(_pgqueuer_loop(dsn, batch, ready, go, out))


async def _pgqueuer_loop(dsn, batch, ready, go, out):
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import EntrypointExecutionParameter, Queries

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    q = Queries(PsycopgDriver(conn))
    manager = uuid.uuid4()
    entrypoints = {"noop": EntrypointExecutionParameter(concurrency_limit=0)}
    ready.put(1)
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    done = 0
    while True:
        jobs = await q.dequeue(batch, entrypoints, manager, None, timedelta(seconds=30))
        if not jobs:
            break
        await q.log_jobs([(job, "successful", None) for job in jobs])
        done += len(jobs)
    await conn.close()
    out.put(done)


def _timed(target, args, num_procs) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, ready, go, out)) for _ in range(num_procs)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    start = time.perf_counter()
    go.set()
    done = sum(out.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    return elapsed, done


def _clean_slate(pg, names) -> None:
    """Drop a finished run's databases and checkpoint, so the next run (of either system)
    does not share the cores with the vacuum of this one's dead rows, nor pay its
    full-page writes."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute("CHECKPOINT")


def _warm_wal(pg) -> None:
    """Write and checkpoint about 300 MB of WAL before the first run. A fresh data folder
    creates (zero-fills) its WAL files as it writes; later runs reuse them. Without this
    the first run timed (Krablet's, one shard) paid that alone: in one series it took 41
    µs of server CPU per job against 34-37 for the runs after it."""
    import psycopg

    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE warm_wal AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 1000000) g")
        conn.execute("DROP TABLE warm_wal")
        conn.execute("CHECKPOINT")


def _analyze(dsns, table) -> None:
    """Steady state, not the first seconds after a bulk load: give both queues fresh
    planner statistics (autovacuum would, within a minute)."""
    import psycopg

    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ANALYZE {table}")


def bench_krablet(pg, num_shards, num_procs, num_jobs, batch, tag) -> dict:
    from krablet.queue import NewJob
    from krablet.schema import migrate
    from krablet.shards import ShardSet

    names = [f"kr_{tag}_{i}" for i in range(num_shards)]
    dsns = [pg.create_database(name) for name in names]
    for dsn in dsns:
        migrate(dsn)
    t = time.perf_counter()
    shards = ShardSet(dsns)
    for lo in range(0, num_jobs, 10_000):
        shards.submit([NewJob("noop", {}, key=f"j{i}") for i in range(lo, min(lo + 10_000, num_jobs))])
    enqueue_s = time.perf_counter() - t
    _analyze(dsns, "krablet_jobs")
    elapsed, done = _timed(_krablet_proc, (dsns, batch), num_procs)
    assert done == num_jobs, (done, num_jobs)
    _clean_slate(pg, names)
    return {"system": "krablet", "shards": num_shards, "procs": num_procs, "jobs": done, "seconds": elapsed,
            "jobs_per_s": done / elapsed, "enqueue_jobs_per_s": num_jobs / enqueue_s}


def bench_pgqueuer(pg, num_procs, num_jobs, batch, tag) -> dict:
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    dsn = pg.create_database(f"pgq_{tag}")

    async def setup() -> float:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        q = Queries(PsycopgDriver(conn))
        await q.install()
        t = time.perf_counter()
        for lo in range(0, num_jobs, 10_000):
            n = min(10_000, num_jobs - lo)
            await q.enqueue(["noop"] * n, [None] * n, [0] * n)
        took = time.perf_counter() - t
        await conn.close()
        return took

    enqueue_s = asyncio.run(setup())
    _analyze([dsn], "pgqueuer")
    elapsed, done = _timed(_pgqueuer_proc, (dsn, batch), num_procs)
    assert done == num_jobs, (done, num_jobs)
    _clean_slate(pg, [f"pgq_{tag}"])
    return {"system": "pgqueuer", "shards": 1, "procs": num_procs, "jobs": done, "seconds": elapsed,
            "jobs_per_s": done / elapsed, "enqueue_jobs_per_s": num_jobs / enqueue_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    # 200,000 jobs: 5-13 s a run, long enough that start-up and the first plans do not weigh.
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "queue_throughput.json"))
    args = parser.parse_args()
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    logging.getLogger("krablet").setLevel(logging.WARNING)

    from krablet.embedded import EmbeddedPostgres

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(tmp, num_shards=0)
        pg.start()
        try:
            _warm_wal(pg)
            for procs in args.procs:
                for shards in (1, 2):
                    rows.append(bench_krablet(pg, shards, procs, args.jobs, args.batch, f"{shards}_{procs}"))
                    print(_fmt(rows[-1]), flush=True)
                rows.append(bench_pgqueuer(pg, procs, args.jobs, args.batch, str(procs)))
                print(_fmt(rows[-1]), flush=True)
        finally:
            pg.stop()
    print("\n| system   | shards | procs | jobs/s (claim+complete) | enqueue jobs/s |")
    print("|----------|--------|-------|-------------------------|----------------|")
    for r in rows:
        print(f"| {r['system']:<8} | {r['shards']:>6} | {r['procs']:>5} | {r['jobs_per_s']:>23,.0f} |"
              f" {r['enqueue_jobs_per_s']:>14,.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch": args.batch, "jobs_per_run": args.jobs, "cpu_count": os.cpu_count(),
                   "durable_commits": True, "runs": rows}, f, indent=2)
    print(f"wrote {args.out}")


def _fmt(r: dict) -> str:
    return (f"{r['system']:<8} shards={r['shards']} procs={r['procs']:>2}: {r['jobs_per_s']:,.0f} jobs/s "
            f"({r['jobs']} in {r['seconds']:.2f}s)")


if __name__ == "__main__":
    main()
