"""The step log line, metrics.jsonl and TensorBoard.

    step 120/2000 | loss 0.5120 | gnorm 0.81 | lr 3.0e-04 | 41.2 samples/s | 3.3k tok/s | mfu 47.3% | 12.1 GiB | data 0.4%

`data` is the share of wall time spent waiting for the next batch.

Only rank 0 writes. On resume, rows past the resumed step (logged by the run
that crashed after its last checkpoint) are dropped from metrics.jsonl and
TensorBoard's purge_step hides them, so the files read as one run.
"""

import json
import logging
import os
import resource
import time

import torch

log = logging.getLogger("k2train")


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _truncate_jsonl(path: str, after_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = []
    for line in rows:
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


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
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.flops_per_sample = flops_per_sample
        self.tokens_per_sample = tokens_per_sample
        self.peak = peak_flops * world_size if peak_flops else None
        self.device = device
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        self._t0 = time.perf_counter()
        self._samples = 0
        self._data_s = 0.0
        if not enabled:
            return
        _truncate_jsonl(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)

    def count(self, samples: int, data_seconds: float = 0.0) -> None:
        """Records one step: its samples and the seconds it waited for data."""
        self._samples += samples
        self._data_s += data_seconds

    def log(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Adds throughput figures since the last call, writes a row, prints the line."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        sps = self._samples / dt
        row = {"step": step, **values, "samples_per_s": sps, "tokens_per_s": sps * self.tokens_per_sample,
               "data_wait": self._data_s / dt}
        if self.peak:
            row["mfu"] = sps * self.flops_per_sample / self.peak
        row["memory_gib"] = memory_gib(self.device)
        self._t0, self._samples, self._data_s = now, 0, 0.0
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        log.info(self.format(row))
        return row

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
        known = {"step", "loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "mfu", "memory_gib", "data_wait"}
        parts.extend(f"{k} {v:.4f}" for k, v in row.items() if k not in known)  # objective terms
        return " | ".join(parts)

    def image(self, tag: str, image_HWC, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image_HWC, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
