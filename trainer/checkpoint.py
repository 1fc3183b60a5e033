"""Distributed checkpoints that are either complete or invisible.

Layout under run_dir/checkpoints/:

    step_00000200/            a complete checkpoint (DCP shards + metadata)
        train_state.json      step, samples seen, loader position, world size
        rank_00000.pt         that rank's RNG states
    step_00000300.partial/    being written (or left by a crash): never loaded

Every rank writes into the `.partial` folder; once all ranks are done, rank 0
renames it. A rename within one filesystem is atomic, so a job killed at any
instant leaves either the previous checkpoint or the new one, never half of
one. Model and optimizer state go through torch.distributed.checkpoint (DCP)
with fully-qualified parameter names, so a checkpoint written by N ranks loads
on M ranks.
"""

import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.config import CheckpointConfig
from trainer.parallel import Dist

log = logging.getLogger(__name__)
# One process without a process group is a supported setup, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    loader: dict = field(default_factory=dict)
    world_size: int = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(folder)) if m)


class Checkpointer:
    def __init__(self, folder: str, cfg: CheckpointConfig, d: Dist):
        self.folder, self.cfg, self.d = folder, cfg, d
        self.pending: tuple[object, str, str] | None = None  # (future, partial dir, final dir)
        self.process_group = None
        if cfg.async_save and d.world_size > 1 and d.device.type == "cuda":
            # Background writes must not share NCCL with the training step.
            self.process_group = dist.new_group(backend="gloo")
        if d.is_main:
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):
                if name.endswith(".partial"):
                    log.warning("removing incomplete checkpoint %s", name)
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        d.barrier()

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step_{step:08d}")

    def latest(self) -> int | None:
        steps = list_checkpoints(self.folder)
        return steps[-1] if steps else None

    def _tensors(self, model, optimizer, extra: dict[str, dict]) -> dict:
        sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        sd.update(extra)
        return sd

    def save(self, state: TrainState, model, optimizer, extra: dict[str, dict]) -> None:
        """Writes a checkpoint of `state.step`. `extra` holds more named tensor dicts (EMA, objective)."""
        self.wait()  # one write in flight at a time
        final = self.path(state.step)
        if os.path.isdir(final):
            return
        partial = final + ".partial"
        if self.d.is_main:
            os.makedirs(partial, exist_ok=True)
        self.d.barrier()
        torch.save(rng_state(), os.path.join(partial, f"rank_{self.d.rank:05d}.pt"))
        if self.d.is_main:
            with open(os.path.join(partial, "train_state.json"), "w") as f:
                json.dump(state.__dict__, f)
        sd = self._tensors(model, optimizer, extra)
        if self.cfg.async_save:
            fut = dcp.async_save(sd, checkpoint_id=partial, process_group=self.process_group)
            self.pending = (fut, partial, final)
        else:
            dcp.save(sd, checkpoint_id=partial)
            self._publish(partial, final)

    def poll(self) -> None:
        """Publishes a finished asynchronous save once every rank's write is done."""
        if self.pending is not None and self.d.all_true(self.pending[0].done()):
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        fut, partial, final = self.pending
        fut.result()
        self.pending = None
        self._publish(partial, final)

    def _publish(self, partial: str, final: str) -> None:
        self.d.barrier()
        if self.d.is_main:
            _fsync_dir(partial)
            os.rename(partial, final)
            _fsync_dir(self.folder)
            for step in list_checkpoints(self.folder)[: -self.cfg.keep]:
                shutil.rmtree(self.path(step), ignore_errors=True)
            log.info("checkpoint saved: %s", final)
        self.d.barrier()

    def load(self, step: int, model, optimizer, extra: dict[str, Callable[[], dict]]) -> tuple[TrainState, dict]:
        """Restores model and optimizer in place; returns the train state and the loaded extras.

        `extra` maps a name to a function giving a template dict (same keys and
        shapes as saved), which DCP fills in.
        """
        path = self.path(step)
        with open(os.path.join(path, "train_state.json")) as f:
            state = TrainState(**json.load(f))
        sd = self._tensors(model, optimizer, {k: make() for k, make in extra.items()})
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, optimizer, sd["optimizer"])
        rank_file = os.path.join(path, f"rank_{self.d.rank:05d}.pt")
        if os.path.exists(rank_file) and state.world_size == self.d.world_size:
            set_rng_state(torch.load(rank_file, weights_only=False))
        log.info("resumed from %s (step %d)", path, state.step)
        return state, {k: sd[k] for k in extra}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint(path: str) -> str | None:
    """A complete checkpoint folder from a run dir, its checkpoints/ dir or a step dir; None if not ours."""
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        steps = list_checkpoints(folder)
        if steps:
            return os.path.join(folder, f"step_{steps[-1]:08d}")
    return None


def load_model_weights(model: torch.nn.Module, path: str, which: str = "ema") -> str:
    """Loads the EMA ("ema") or live ("model") weights of a k2train checkpoint into an unsharded model.

    Falls back to the live weights when the checkpoint has no EMA. Parameters the
    checkpoint lacks (a new stage's extras in model.aux) keep their values.
    Returns the checkpoint folder used.
    """
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ValueError(f"{path} holds no complete k2train checkpoint")
    saved = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    if which == "ema" and not any(k.startswith("ema.") for k in saved):
        which = "model"
    own = model.state_dict() if which == "model" else {n: p.detach().clone() for n, p in model.named_parameters()}
    template = {n: t for n, t in own.items() if f"{which}.{n}" in saved}
    missing = [n for n in own if n not in template and not n.startswith("aux.")]
    if missing:
        raise ValueError(f"{step_dir} lacks {len(missing)} weights of this model, e.g. {missing[:3]}")
    sd = {which: template}
    dcp.load(sd, checkpoint_id=step_dir)
    model.load_state_dict(sd[which], strict=False)
    return step_dir
