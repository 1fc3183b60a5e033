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

Damage is detected, never trained on. Before the rename, every file is fsynced and
`checksums.json` records each file's size and block hashes (trainer/checksums.py). A
restart verifies the newest checkpoint before it loads anything; one that fails (a file
missing, truncated or changed in place, a file that does not parse, non-finite values)
is named with its bad files in the log, moved to checkpoints/damaged/ (never deleted),
and the next older one is tried. keep-last-k counts only complete checkpoints in
checkpoints/, so it never deletes the last one that verified in favour of a damaged one.
"""

import io
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer import checksums
from trainer.config import CheckpointConfig
from trainer.model import clean_name
from trainer.parallel import Dist

log = logging.getLogger(__name__)
# One process without a process group is a supported setup, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
STEP_DIR = re.compile(r"^step_(\d{8})$")
MODELS_FILE = "models.json"
DAMAGED = "damaged"  # checkpoints that failed verification, kept for inspection


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: which folder, which files, why."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(problems))


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    loader: dict = field(default_factory=dict)
    world_size: int = 1
    # Written with checksums.json (False in checkpoints from before checksums): a checkpoint
    # that says so but has none lost it, and is not trusted.
    checksummed: bool = False


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


def part_keys(name: str) -> tuple[str, str, str]:
    """Top-level checkpoint keys of a trainable model: (weights, optimizer, EMA).

    The stage's main model is "model" and keeps the historical keys (model,
    optimizer, ema), so checkpoints of single-model runs read as they always did;
    any other model `x` is saved as (x, x_optimizer, x_ema)."""
    if name == "model":
        return "model", "optimizer", "ema"
    return name, f"{name}_optimizer", f"{name}_ema"


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

    @staticmethod
    def _tensors(trainables: dict, extra: dict[str, dict]) -> dict:
        sd = {}
        for name, t in trainables.items():
            weights, optim, ema = part_keys(name)
            sd[weights] = model_state_dict(t.module)
            if t.optimizer is not None:
                sd[optim] = get_optimizer_state_dict(t.module, t.optimizer)
            if t.ema is not None:
                sd[ema] = t.ema.state_dict()
        overlap = set(sd) & set(extra)
        assert not overlap, f"stage state names {overlap} collide with model names"
        sd.update(extra)
        return sd

    def save(self, state: TrainState, trainables: dict, extra: dict[str, dict], models: dict[str, dict]) -> None:
        """Writes a checkpoint of `state.step`: every trainable's weights, optimizer and EMA,
        the stage's own tensors (`extra`), and `models.json` (`models`: what each model is —
        its config, its LoRA settings and base, the source of a frozen model)."""
        self.wait()  # one write in flight at a time
        final = self.path(state.step)
        if os.path.isdir(final):
            return
        partial = final + ".partial"
        if self.d.is_main:
            os.makedirs(partial, exist_ok=True)
        self.d.barrier()
        buf = io.BytesIO()
        torch.save(rng_state(), buf)
        checksums.write_synced(os.path.join(partial, f"rank_{self.d.rank:05d}.pt"), buf.getvalue())
        if self.d.is_main:
            state.checksummed = True
            checksums.write_synced(os.path.join(partial, "train_state.json"), json.dumps(state.__dict__).encode())
            checksums.write_synced(os.path.join(partial, MODELS_FILE), json.dumps(models, indent=1).encode())
        sd = self._tensors(trainables, extra)
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
        t0 = time.perf_counter()
        checksums.record(partial, self.d)  # DCP fsyncs its own files
        if self.d.is_main:
            _fsync_dir(partial)
            os.rename(partial, final)
            _fsync_dir(self.folder)
            for step in list_checkpoints(self.folder)[: -self.cfg.keep]:
                shutil.rmtree(self.path(step), ignore_errors=True)
            log.info("checkpoint saved: %s (checksums %.1f s)", final, time.perf_counter() - t0)
        self.d.barrier()

    def problems(self, step: int) -> list[str]:
        """Why checkpoint `step` cannot be trusted, file by file (empty: it verified).
        All ranks call this together and get the same answer."""
        path = self.path(step)
        try:
            found = checksums.verify(path, self.d)
        except checksums.ChecksumError as e:
            found = [str(e)]
        return self.d.from_main(found + _readable(path) if self.d.is_main else None)

    def set_aside(self, step: int, problems: list[str]) -> str:
        """Moves a damaged checkpoint to checkpoints/damaged/ with a note of what is wrong."""
        src = self.path(step)
        dst = os.path.join(self.folder, DAMAGED, f"{os.path.basename(src)}-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.d.is_main:
            log.error("checkpoint %s is damaged and will not be loaded:\n  %s\nmoved to %s", src,
                      "\n  ".join(problems), dst)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            with open(os.path.join(dst, "DAMAGED.txt"), "w") as f:
                f.write("".join(p + "\n" for p in problems))
            _fsync_dir(self.folder)
        self.d.barrier()
        return dst

    def newest_good(self) -> int | None:
        """The newest checkpoint that verifies; damaged ones on the way are set aside."""
        for step in reversed(list_checkpoints(self.folder)):
            found = self.problems(step)
            if not found:
                return step
            self.set_aside(step, found)
        return None

    def load(self, step: int, trainables: dict, extra: dict[str, Callable[[], dict]]) -> tuple[TrainState, dict]:
        """Restores every trainable (weights, optimizer, EMA) in place; returns the train
        state and the loaded stage tensors. `extra` maps a name to a function giving a
        template dict (same keys and shapes as saved), which DCP fills in."""
        path = self.path(step)
        try:
            return self._load(path, trainables, extra)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # a damaged file that had no checksum to catch it
            raise CheckpointError(path, [f"loading failed: {_first_line(e)}"]) from e

    def _load(self, path: str, trainables: dict, extra: dict[str, Callable[[], dict]]) -> tuple[TrainState, dict]:
        with open(os.path.join(path, "train_state.json")) as f:
            state = TrainState(**json.load(f))
        sd = self._tensors(trainables, {k: make() for k, make in extra.items()})
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        for name, t in trainables.items():
            if t.ema is not None:
                ema = part_keys(name)[2]
                sd[ema] = _as_saved(sd[ema], ema, saved)
        dcp.load(sd, checkpoint_id=path)
        for name, t in trainables.items():
            weights, optim, ema = part_keys(name)
            load_model_state_dict(t.module, sd[weights])
            if t.optimizer is not None:
                set_optimizer_state_dict(t.module, t.optimizer, sd[optim])
            if t.ema is not None:
                t.ema.load_state_dict({clean_name(k): v for k, v in sd[ema].items()})
        rank_file = os.path.join(path, f"rank_{self.d.rank:05d}.pt")
        if state.world_size == self.d.world_size:
            if not os.path.exists(rank_file):
                raise CheckpointError(path, [f"{os.path.basename(rank_file)}: missing (this rank's RNG state)"])
            set_rng_state(torch.load(rank_file, weights_only=False))
        log.info("resumed from %s (step %d)", path, state.step)
        return state, {k: sd[k] for k in extra}


def _as_saved(part: dict, prefix: str, saved: dict) -> dict:
    """`part` (clean names) keyed as the checkpoint stored them: checkpoints written before
    names were cleaned hold EMA keys with wrapper segments (`blocks.0._orig_mod.…`)."""
    head = prefix + "."
    by_clean = {clean_name(k[len(head):]): k[len(head):] for k in saved if k.startswith(head)}
    return {by_clean.get(k, k): v for k, v in part.items()}


# Trainable parameters only: a LoRA run saves its adapters, not another copy of the base.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def model_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights under the names written to disk (no wrapper or adapter names)."""
    return {clean_name(k): v for k, v in get_model_state_dict(module, options=_TRAINABLE).items()}


def load_model_state_dict(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = get_model_state_dict(module, options=_TRAINABLE)
    by_clean = {clean_name(k): k for k in own}
    set_model_state_dict(module, {by_clean[k]: v for k, v in sd.items()},
                         options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _first_line(e: BaseException) -> str:
    """An exception in one line; DCP's CheckpointException wraps each rank's (e.g. EOFError)."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, inner = next(iter(failures.items()))
        inner = inner[0] if isinstance(inner, tuple) else inner  # (exception, traceback)
        return f"rank {rank}: {type(inner).__name__}: {inner}".rstrip(": ")
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _readable(path: str) -> list[str]:
    """The files every checkpoint needs, parsed (what a checkpoint without checksums can be
    checked for before loading); problems one per line."""
    try:
        with open(os.path.join(path, "train_state.json")) as f:
            state = TrainState(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        return [f"train_state.json: {type(e).__name__}: {e}"]
    found = []
    if state.checksummed and not os.path.exists(os.path.join(path, checksums.MANIFEST)):
        found.append(f"{checksums.MANIFEST}: missing, though train_state.json says it was written")
    try:
        dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        found.append(f".metadata: {type(e).__name__}: {e}")
    try:
        read_models(path)
    except (OSError, ValueError) as e:
        found.append(f"{MODELS_FILE}: {type(e).__name__}: {e}")
    return found


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


def verify_checkpoint(step_dir: str) -> None:
    """Raises CheckpointError naming every bad file of a checkpoint read outside a run
    (init_from, evaluation, sampling, export): such a source is never set aside or
    replaced by an older one, the user named it."""
    try:
        found = checksums.verify(step_dir)
    except checksums.ChecksumError as e:
        found = [str(e)]
    found += _readable(step_dir)
    if found:
        raise CheckpointError(step_dir, found)


def read_models(step_dir: str) -> dict[str, dict]:
    """models.json of a checkpoint: {model name: {"config": ..., "lora": ..., "base": ...}};
    empty for checkpoints written before it existed."""
    path = os.path.join(step_dir, MODELS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_tensors(step_dir: str, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor saved under top-level key `prefix` (e.g. "ema"), as plain CPU tensors
    named without the prefix; no model needed (shapes come from the metadata)."""
    saved = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    head = prefix + "."
    template = {k[len(head):]: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in saved.items() if k.startswith(head) and isinstance(m, TensorStorageMetadata)}
    if template:
        dcp.load({prefix: template}, checkpoint_id=step_dir)
    # Checkpoints written before names were cleaned carry wrapper segments in their EMA keys.
    return {clean_name(k): v for k, v in template.items()}


def load_model_weights(model: torch.nn.Module, path: str, which: str = "ema") -> str:
    """Loads the EMA ("ema") or live ("model") weights of a full-weights k2train checkpoint
    into an unsharded model (LoRA runs: trainer/weights.py merges them onto their base).

    Falls back to the live weights when the checkpoint has no EMA. Parameters the
    checkpoint lacks (a new stage's extras in model.aux) keep their values.
    Returns the checkpoint folder used.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {which!r}")
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ValueError(f"{path} holds no complete k2train checkpoint")
    sd = read_tensors(step_dir, which) if which == "ema" else {}
    if not sd:
        sd = read_tensors(step_dir, "model")
    own = model.state_dict()
    missing = [n for n in own if n not in sd and not n.startswith("aux.")]
    if missing:
        raise ValueError(f"{step_dir} lacks {len(missing)} weights of this model, e.g. {missing[:3]}")
    bad = [f"{n}: {tuple(sd[n].shape)} vs model {tuple(own[n].shape)}" for n in own
           if n in sd and sd[n].shape != own[n].shape]
    if bad:
        raise ValueError(f"{step_dir}: weights do not fit this model: {bad[:3]}")
    model.load_state_dict({n: sd[n] for n in own if n in sd}, strict=False)
    return step_dir
