"""Stopping a run cleanly when the cluster asks, and telling the job script why it stopped.

A scheduler warns a job before it takes the nodes away: Slurm's
``--signal=USR1@300`` before the time limit, SIGTERM on preemption or
``scancel``. Each rank records the signal in its handler; after every step the
ranks agree (one all-reduce of a flag) so they all stop after the *same* step,
save a checkpoint together and exit 0.

``status.json`` in the run directory says how the last attempt ended:
``running`` (still going, or killed without warning), ``preempted``,
``finished`` or ``failed``. ``slurm/train.sbatch`` reads it to decide whether
to requeue the job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

from trainer.parallel import Dist

log = logging.getLogger("k2train")


class Preemption:
    """Installs handlers for `signals` (names like "SIGUSR1"); `check` is collective."""

    def __init__(self, signals: list[str]):
        self.received: str | None = None
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"checkpoint.preempt_signals: {name!r} is not a signal name (e.g. SIGUSR1)")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: stopping after this step with a checkpoint", self.received)

    def check(self, d: Dist) -> bool:
        """True on every rank once any rank got a signal."""
        return d.any_true(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def write_status(run_dir: str, state: str, step: int, **extra) -> None:
    status = {"state": state, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")), **extra}
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, f"status.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, os.path.join(run_dir, "status.json"))


def read_status(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"state": "missing"}
