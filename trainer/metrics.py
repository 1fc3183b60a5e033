"""The step log line, metrics.jsonl, TensorBoard and (optionally) Weights & Biases.

    step 120/2000 | loss 0.5120 | gnorm 0.81 | lr 3.0e-04 | 41.2 samples/s | 3.3k tok/s | mfu 47.3% | 12.1 GiB | data 0.4% | 0.84 s/step | eta 26m19s

`data` is the share of wall time spent waiting for the next batch; `s/step` the wall
time per optimizer step since the last line; `eta` the remaining steps at a smoothed
step time.

Samples the loader skipped (non-finite or absurd latents) are counted in the row's
`data_skipped` and listed with shard and key in skipped_samples.jsonl.

Only rank 0 writes. On resume, rows past the resumed step (logged by the run
that crashed after its last checkpoint) are dropped from metrics.jsonl (and
skipped_samples.jsonl) and
TensorBoard's purge_step hides them, so the files read as one run. W&B cannot
rewrite history: the resumed run continues the same W&B run (id from the run name,
resume="allow") and sends it only steps past the last one it already has.
"""

import hashlib
import json
import logging
import os
import re
import resource
import time

import torch

log = logging.getLogger("k2train")


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _truncate_jsonl(path: str, after_step: int) -> int:
    """Drops rows past after_step; returns the last step the file held before (0: none)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept, last = [], 0
    for line in rows:
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        last = max(last, step)
        if step <= after_step:
            kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return last


def wandb_run_id(run_name: str) -> str:
    """W&B run ids allow only [A-Za-z0-9_-]; a name that needed changing gets a hash of
    the original, so two names that differ only in other characters stay two runs."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)
    return clean if clean == run_name else f"{clean}-{hashlib.sha1(run_name.encode()).hexdigest()[:8]}"


def duration(seconds: float) -> str:
    """45s, 12m30s, 3h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class MetricsLogger:
    def __init__(
        self,
        run_dir: str,
        enabled: bool,
        start_step: int,
        total_steps: int,
        flops_per_sample: float,
        tokens_per_sample: int,
        peak_flops: float | None,
        world_size: int,
        device: torch.device,
        tensorboard: bool = True,
        *,
        wandb: bool = False,
        wandb_project: str = "k2train",
        wandb_entity: str | None = None,
        wandb_mode: str = "offline",
        run_name: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.flops_per_sample = flops_per_sample
        self.tokens_per_sample = tokens_per_sample
        self.peak = peak_flops * world_size if peak_flops else None
        self.device = device
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.skipped_path = os.path.join(run_dir, "skipped_samples.jsonl")
        self.tb = None
        self.wb = None
        self._t0 = time.perf_counter()
        self._samples = 0
        self._steps = 0
        self._data_s = 0.0
        self._rows = 0
        self._step_s_smooth: float | None = None
        if not enabled:
            return
        last_logged = _truncate_jsonl(self.path, start_step)
        _truncate_jsonl(self.skipped_path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        if wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb as wandb_lib  # lazily: runs without W&B never import it

            run_name = run_name or os.path.basename(os.path.normpath(run_dir))
            self.wb = wandb_lib.init(
                project=wandb_project, entity=wandb_entity, name=run_name, id=wandb_run_id(run_name),
                resume="allow", dir=run_dir, mode=wandb_mode, config=config,
            )
            # W&B drops (online) or duplicates (offline, at sync) steps it already has. Online
            # its resumed run knows its next step; offline it knows nothing, but metrics.jsonl
            # got every row W&B got, so its last step before truncation is W&B's last step.
            self._wandb_after = max(last_logged, self.wb.step - 1)

    def count(self, samples: int, data_seconds: float = 0.0) -> None:
        """Records one optimizer step: its samples and the seconds it waited for data."""
        self._samples += samples
        self._steps += 1
        self._data_s += data_seconds

    def log(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Adds throughput figures since the last call, writes a row, prints the line."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        sps = self._samples / dt
        row = {"step": step, **values, "samples_per_s": sps, "tokens_per_s": sps * self.tokens_per_sample,
               "data_wait": self._data_s / dt, "step_s": dt / max(self._steps, 1)}
        if self.peak:
            row["mfu"] = sps * self.flops_per_sample / self.peak
        row["memory_gib"] = memory_gib(self.device)
        self._t0, self._samples, self._steps, self._data_s = now, 0, 0, 0.0
        # The first window holds the warm-up (compilation, allocator, first batches), so the
        # ETA trusts it only until the second row; later rows move it by an EMA.
        self._rows += 1
        s = row["step_s"]
        self._step_s_smooth = s if self._rows <= 2 else 0.7 * self._step_s_smooth + 0.3 * s
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wb is not None and step > self._wandb_after:
            self.wb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        log.info(self.format(row))
        return row

    def skipped(self, step: int, records: list[dict]) -> None:
        """Samples the data left out (damaged latents) up to `step`: one row each, with its
        shard and key, in skipped_samples.jsonl (their count is the row's `data_skipped`)."""
        if self.enabled and records:
            with open(self.skipped_path, "a") as f:
                f.writelines(json.dumps({"step": step, **r}) + "\n" for r in records)

    def format(self, row: dict) -> str:
        parts = [f"step {row['step']}/{self.total_steps}"]
        if "loss" in row:
            parts.append(f"loss {row['loss']:.4f}")
        if "grad_norm" in row:
            parts.append(f"gnorm {row['grad_norm']:.2f}")
        if "lr" in row:
            parts.append(f"lr {row['lr']:.1e}")
        parts.append(f"{row['samples_per_s']:.1f} samples/s")
        tok = row["tokens_per_s"]
        parts.append(f"{tok / 1000:.1f}k tok/s" if tok >= 1000 else f"{tok:.0f} tok/s")
        parts.append(f"mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "mfu -")
        parts.append(f"{row['memory_gib']:.1f} GiB")
        parts.append(f"data {100 * row['data_wait']:.1f}%")
        if "step_s" in row:
            step_s = self._step_s_smooth if self._step_s_smooth is not None else row["step_s"]
            parts.append(f"{row['step_s']:.2f} s/step")
            parts.append(f"eta {duration(max(self.total_steps - row['step'], 0) * step_s)}")
        known = {"step", "loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "mfu", "memory_gib", "data_wait",
                 "step_s"}
        parts.extend(f"{k} {v:.4f}" for k, v in row.items() if k not in known)  # objective terms
        return " | ".join(parts)

    def image(self, tag: str, image_HWC, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image_HWC, step, dataformats="HWC")
        if self.wb is not None and step > self._wandb_after:
            import wandb

            self.wb.log({tag: wandb.Image(image_HWC)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
