"""The worker loop and the process pool.

One worker = one process with one connection per shard. It rotates over the
shards, claims a batch, runs each job's handler, then completes the successes
and fails the failures in one statement each. A heartbeat thread renews the
leases of the batch in flight (every lease/3), so a long job is not re-run
while its worker is alive; a worker that dies stops renewing and its jobs are
reclaimed once the lease expires.

A handler's bad result (not JSON: a set, NaN, an object) fails that job alone,
like an exception would: the reason is recorded, the job backs off and ends
dead-lettered, the worker goes on. When the heartbeat finds a lease lost, the
job's ``ctx.cancelled()`` turns true, so the handler can stop early.

A shard that refuses the connection for good (wrong password, no such
database) stops the worker at once with the reason and exit status 2; one that
is unreachable for now (restarting, network) is retried with a logged warning.

When idle it polls with jittered exponential backoff (no LISTEN/NOTIFY: it
takes a global lock at commit) and runs the cross-shard ``promote`` pass.

SIGTERM/SIGINT: the job being run finishes, the rest of the batch is released
(back to pending, the attempt not counted), results are written, then exit 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import signal
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from krablet.dsn import Dsn, PermanentConnectionError, mask_dsn, reason
from krablet.kinds import REGISTRY, JobContext, LeaseFlag, import_kinds
from krablet.queue import Job, connect, to_json
from krablet.shards import SHARD_DOWN_ERRORS, Shard, ShardSet

log = logging.getLogger("krablet.worker")


@dataclass
class WorkerConfig:
    dsns: list[str]
    batch_size: int = 100  # jobs per claim statement
    lease_s: float = 30.0  # renewed by the heartbeat; a dead worker's jobs come back after this
    backoff_base_s: float = 1.0  # failed attempt k waits base * 2^(k-1) ...
    backoff_cap_s: float = 300.0  # ... at most this long
    idle_min_s: float = 0.02  # idle polling backoff range
    idle_max_s: float = 1.0
    promote_every_s: float = 1.0
    drain: bool = False  # exit 0 once no runnable work remains on any shard
    kind_modules: list[str] = field(default_factory=list)  # modules that register extra kinds

    def __post_init__(self):
        # Dsn prints masked: repr(config), logs and tracebacks never show a password.
        self.dsns = [Dsn(d) for d in self.dsns]


class Worker:
    def __init__(self, config: WorkerConfig):
        import_kinds(config.kind_modules)
        self.config = config
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.shards = ShardSet(config.dsns, lease_s=config.lease_s, backoff_base_s=config.backoff_base_s,
                               backoff_cap_s=config.backoff_cap_s)
        self.stopping = False
        # Outcomes that could not be written because the shard went down: retried when it is back.
        self.unsent: dict[int, tuple[dict[int, Any], dict[int, str]]] = {}
        self.num_done = self.num_failed = self.num_lost = 0
        self._in_flight: tuple[int, list[int]] | None = None  # (shard index, job ids)
        # Ids whose lease the heartbeat found lost, one set per batch: each handler's
        # ctx.cancelled() looks its own id up there.
        self._lease_lost: set[int] = set()
        self._lock = threading.Lock()

    def stop(self, *_):
        self.stopping = True

    # -- main loop ---------------------------------------------------------------

    def run(self) -> int:
        heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True)
        heartbeat.start()
        idle = self.config.idle_min_s
        last_promote = 0.0
        offset = random.randrange(len(self.shards))
        try:
            while not self.stopping:
                worked = False
                for i in range(len(self.shards)):
                    if self.stopping:
                        break
                    worked |= self._step(self.shards.shards[(offset + i) % len(self.shards)])
                offset += 1
                if worked:
                    idle = self.config.idle_min_s
                    continue
                promoted = None
                if time.monotonic() - last_promote >= self.config.promote_every_s or self.config.drain:
                    promoted = self.shards.promote()
                    last_promote = time.monotonic()
                    if promoted:
                        continue
                if self.config.drain and promoted == 0 and not self.unsent and self._nothing_left():
                    break
                time.sleep(idle * random.uniform(0.5, 1.0))
                idle = min(idle * 2, self.config.idle_max_s)
        finally:
            self.stopping = True
            for shard in self.shards.shards:
                if shard.index in self.unsent:
                    self._sync(shard, claim=False)
            self.shards.close()
        log.info("worker %s exits: %d done, %d failed, %d lost", self.owner, self.num_done, self.num_failed,
                 self.num_lost)
        return 0

    def _step(self, shard: Shard) -> bool:
        """Write this shard's buffered outcomes and claim its next batch in one
        transaction (one commit, so one fsync, per batch), then run the batch.
        True if it ran jobs."""
        jobs = self._sync(shard, claim=True)
        if not jobs:
            return False
        self._run_batch(shard, jobs)
        return True

    def _sync(self, shard: Shard, claim: bool) -> list[Job] | None:
        """Complete/fail the buffered outcomes of ``shard`` and optionally claim a
        batch, atomically. None if the shard is unreachable (outcomes stay buffered)."""
        q = shard.queue()
        if q is None:
            return None
        results, errors = self.unsent.get(shard.index, ({}, {}))
        try:
            try:
                n = self.config.batch_size if claim and not self.stopping else 0
                lost, dead, lost_f, jobs = q.sync(self.owner, results, errors, n)
            except SHARD_DOWN_ERRORS:
                raise
            except psycopg.Error as e:
                # The shard refused one of the outcomes (a statement error, not an outage):
                # write them one by one, so only the job whose outcome cannot be stored fails.
                log.warning("shard %d refused a batch of outcomes (%s): writing them one by one",
                            shard.index, reason(e))
                results, errors, lost, dead, lost_f = self._write_one_by_one(q, results, errors)
                jobs = []
        except SHARD_DOWN_ERRORS as e:
            log.warning("shard %d unreachable (%s): %s", shard.index, mask_dsn(shard.dsn), reason(e))
            shard.mark_down()
            return None
        shard.mark_up()
        with self._lock:
            self.unsent.pop(shard.index, None)
            if jobs:
                self._in_flight = (shard.index, [j.id for j in jobs])
        if lost or lost_f:
            log.warning("lost the lease of %d jobs on shard %d (another worker took them): %s",
                        len(lost) + len(lost_f), shard.index, (lost + lost_f)[:10])
        if dead:
            log.warning("%d jobs dead-lettered on shard %d", len(dead), shard.index)
        self.num_done += len(results) - len(lost)
        self.num_failed += len(errors) - len(lost_f)
        self.num_lost += len(lost) + len(lost_f)
        return jobs

    def _write_one_by_one(self, q, results: dict[int, str], errors: dict[int, str]):
        """Each outcome in its own statement; an outcome the shard refuses becomes that job's failure."""
        lost: list[int] = []
        for job_id, result in list(results.items()):
            try:
                lost += q.complete_json(self.owner, {job_id: result})
            except SHARD_DOWN_ERRORS:
                raise
            except psycopg.Error as e:
                del results[job_id]
                errors[job_id] = f"the shard refused the result: {reason(e)}"
        dead: list[int] = []
        lost_f: list[int] = []
        for job_id, error in errors.items():
            try:
                d, lf = q.fail(self.owner, {job_id: error})
            except SHARD_DOWN_ERRORS:
                raise
            except psycopg.Error as e:
                d, lf = q.fail(self.owner, {job_id: f"the shard refused the error message: {reason(e)}"})
            dead += d
            lost_f += lf
        return results, errors, lost, dead, lost_f

    def _run_batch(self, shard: Shard, jobs: list[Job]) -> None:
        results: dict[int, str] = {}  # job id -> its result as JSON text
        errors: dict[int, str] = {}
        unrun: list[int] = []
        lost: set[int] = set()
        with self._lock:
            self._lease_lost = lost
        for job in jobs:
            if self.stopping:
                unrun.append(job.id)
                continue
            handler = REGISTRY.get(job.kind)
            try:
                if handler is None:
                    raise LookupError(f"no handler registered for kind {job.kind!r} in this worker")
                result = handler.handler(job.payload, JobContext(job.key, job.attempts, self.owner,
                                                                 LeaseFlag(job.id, lost)))
                # Serialised here, so a result that is not JSON fails this job, not the batch's write.
                results[job.id] = to_json(result, f"the result of {job.kind} job {job.key!r}")
            except Exception as e:  # the job failed, not the worker
                errors[job.id] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        # Outcomes are written with the next claim on this shard (or at exit); until
        # then the heartbeat keeps their leases.
        with self._lock:
            self._in_flight = None
            self._lease_lost = set()
            self.unsent[shard.index] = (results, errors)
        if unrun:
            q = shard.queue()
            try:
                if q is not None:
                    q.release(self.owner, unrun)
            except SHARD_DOWN_ERRORS:
                shard.mark_down()  # they come back when the lease expires

    def _held_ids(self) -> dict[int, list[int]]:
        """Per shard, the ids whose leases we must keep: running now or outcome not yet written."""
        with self._lock:
            held = {i: list(r) + list(e) for i, (r, e) in self.unsent.items()}
            if self._in_flight is not None:
                index, ids = self._in_flight
                held[index] = held.get(index, []) + ids
        return held

    def _nothing_left(self) -> bool:
        for shard in self.shards.shards:
            q = shard.queue()
            if q is None:
                return False
            try:
                if q.outstanding():
                    return False
            except SHARD_DOWN_ERRORS:
                shard.mark_down()
                return False
        return True

    def _heartbeat_loop(self) -> None:
        """Every lease/3, renew the leases of every job this worker still holds."""
        conns: dict[int, Any] = {}
        while not self.stopping:
            time.sleep(self.config.lease_s / 3)
            for index, ids in self._held_ids().items():
                if not ids:
                    continue
                try:
                    if index not in conns or conns[index].closed:
                        conns[index] = connect(self.shards.shards[index].dsn)
                    kept = {r[0] for r in conns[index].execute(
                        "UPDATE krablet_jobs SET lease_expires_at = now() + make_interval(secs => %s)"
                        " WHERE id = ANY(%s) AND lease_owner = %s AND state = 'running' RETURNING id",
                        (self.config.lease_s, ids, self.owner))}
                    if len(kept) < len(ids):
                        log.warning("heartbeat: %d jobs no longer ours on shard %d", len(ids) - len(kept), index)
                        with self._lock:
                            for job_id in ids:
                                if job_id not in kept:
                                    self._lease_lost.add(job_id)  # its handler's ctx.cancelled() is now true
                except SHARD_DOWN_ERRORS:
                    conns.pop(index, None)
        for conn in conns.values():
            conn.close()


def _child(config: WorkerConfig) -> int:
    worker = Worker(config)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    try:
        return worker.run()
    except PermanentConnectionError as e:
        log.error("%s; the worker stops (retrying cannot fix this)", e)
        return 2


def _child_entry(config: WorkerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise SystemExit(_child(config))


def run_pool(config: WorkerConfig, num_procs: int = 1) -> int:
    """Run ``num_procs`` worker processes (in this process when 1); SIGTERM is forwarded to all."""
    if num_procs <= 1:
        return _child(config)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_entry, args=(config,)) for _ in range(num_procs)]
    for p in procs:
        p.start()

    def forward(signum, _frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
    return max(p.exitcode or 0 for p in procs) if all(p.exitcode is not None and p.exitcode >= 0 for p in procs) else 1
