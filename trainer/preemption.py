"""Stopping a run cleanly when the cluster asks, and telling the job script why it stopped.

A scheduler warns a job before it takes the nodes away: Slurm's
``--signal=USR1@300`` before the time limit, SIGTERM on preemption or
``scancel``. Each rank records the signal in its handler; after every step the
ranks agree (one all-reduce of a flag) so they all stop after the *same* step,
save a checkpoint together and exit 0. The all-reduce is read one step late:
waiting on it at once would make the host wait for the GPU every step, and a
signal that comes minutes ahead can spare a step.

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

import torch
import torch.distributed as dist

from trainer.parallel import Dist

log = logging.getLogger("k2train")


class Preemption:
    """Installs handlers for `signals` (names like "SIGUSR1"); `check` is collective."""

    def __init__(self, signals: list[str]):
        self.received: str | None = None
        self._pending = None  # (work, flag) of the last step's all-reduce
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
        """Collective: True on every rank, after the same step, once any rank got a signal."""
        if d.world_size == 1:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)],
                            device=d.device if d.device.type == "cuda" else "cpu")
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())

    def restore(self) -> None:
        if self._pending is not None:  # every rank issued it: complete it before the group goes away
            self._pending[0].wait()
            self._pending = None
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
