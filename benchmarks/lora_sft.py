"""LoRA SFT throughput and peak memory through the real trainer (`python -m trainer.train`).

Each configuration is one trainer process (`stage=sft`, `data=synthetic`, from a
random base model in the release layout): the real step — bf16 compute,
per-block activation checkpointing and compile (`parallel=fsdp_bf16`), AdamW on
the trainable parameters, EMA of them, grad clipping. Throughput comes from the
run's own `metrics.jsonl` (the first `--skip-rows` rows, which hold compilation
and warm-up, are dropped); peak memory is `torch.cuda.max_memory_allocated` over
the whole run (the `memory_gib` column of the last row) and, where NVML answers,
the device memory in use as nvidia-smi reports it (allocator cache and CUDA
context included), sampled every 0.25 s.

    python benchmarks/lora_sft.py                                  # 2b at 1024², the default set of runs
    python benchmarks/lora_sft.py --runs attn:2 attn:4 all:4 full:4
    python benchmarks/lora_sft.py --tiny --device cpu              # smoke check (CPU, seconds)

A run is `TARGETS:BATCH`: TARGETS is `attn` (the default LoRA targets: attention
q, k, v, out), `all` (every linear of a block), or `full` (rank 0: full-weight
training of the same config). A full-weight run is stopped once its last metrics
row is written, before the final checkpoint (model + AdamW + EMA, ~34 GB for 2b),
which is not what is measured here.

The base: a random model (`init_weights(0)`, then the zero-initialised
modulation tables, time projection and final layer drawn from N(0, 0.02) so
that gradients reach the blocks: with adaLN-Zero's zeros every gate is zero,
the backward pass is a pass of zeros and the adapters get no gradient), written
once with `save_pretrained(fmt="release", dtype=bfloat16)` to `--work`.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
ALL_LINEARS = ["attn.q", "attn.k", "attn.v", "attn.gate", "attn.out", "mlp.w_gate", "mlp.w_up", "mlp.w_down"]
TARGETS = {"attn": ["attn.q", "attn.k", "attn.v", "attn.out"], "all": ALL_LINEARS, "full": None}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b", help="name of configs/model/<name>.yaml")
    p.add_argument("--tiny", action="store_true", help="tiny model at 64², for a CPU smoke check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", default="fsdp_bf16", help="configs/parallel/<name>.yaml")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--runs", nargs="+", default=["attn:2", "attn:4", "attn:8", "all:4", "full:4"],
                   help="TARGETS:BATCH, TARGETS one of attn | all | full")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--skip-rows", type=int, default=1, help="metrics rows dropped (compile, warm-up)")
    p.add_argument("--work", default="/tmp/k2_lora_bench", help="base model and run folders")
    p.add_argument("--base", default=None, help="release .safetensors to start from (default: made in --work)")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="start no run after this many seconds, and stop a running one there (0: none)")
    p.add_argument("--min-run-s", type=float, default=60, help="a run is started only with this much time left")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_sft.json"))
    p.add_argument("--log", default=None, help="append every trainer process's output to this file")
    args = p.parse_args()
    if args.tiny:
        args.image_size, args.text_len = 64, 16
        args.steps, args.log_every = min(args.steps, 6), min(args.log_every, 2)
    for spec in args.runs:
        t, _, b = spec.partition(":")
        if t not in TARGETS or not b.isdigit():
            p.error(f"--runs {spec!r}: expected TARGETS:BATCH with TARGETS in {sorted(TARGETS)}")
    return args


def model_overrides(args) -> list[str]:
    if args.tiny:
        # tiny has 3 latent channels and 4 text layers; synthetic data yields 16 and 12.
        return ["model=tiny", "model.latent_channels=16", "model.patch_size=2", "data.text_layers=[1,2,3,4]"]
    return [f"model={args.model}"]


def model_config(args):
    import yaml

    from trainer.model import ModelConfig

    name = "tiny" if args.tiny else args.model
    raw = yaml.safe_load((ROOT / "configs/model" / f"{name}.yaml").read_text())
    if args.tiny:
        raw.update(latent_channels=16, patch_size=2)
    cfg = ModelConfig(**raw)
    cfg.validate()
    return cfg


def make_base(cfg, path: Path) -> float:
    """A random base in the release layout (bf16); returns the seconds it took."""
    import torch

    from trainer.model import K2DiT, save_pretrained

    t0 = time.perf_counter()
    model = K2DiT(cfg)
    model.init_weights(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        zeros = [model.time_proj.weight, model.time_proj.bias, model.final.mod, model.final.linear.weight,
                 model.final.linear.bias] + [b.mod for b in model.blocks]
        for p in zeros:
            p.normal_(0.0, 0.02, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_pretrained(model, tmp, fmt="release", dtype=torch.bfloat16)
    os.replace(tmp, path)
    del model
    return time.perf_counter() - t0


def device_info(device: str) -> dict:
    info = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    else:
        info["device"] = info.get("device") or platform.processor() or "cpu"
    return info


class MemoryPoller:
    """Peak device memory in use (MiB, as nvidia-smi reports it) while a run lasts, through NVML."""

    def __init__(self, period: float = 0.25):
        self.period, self.peak, self.baseline = period, None, None
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._used = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
            self.baseline = self._used()
        except Exception:  # noqa: BLE001 - no NVML (CPU machine): no reading
            self._used = None

    def __enter__(self):
        if self._used is not None:
            self.peak = self._used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                self.peak = max(self.peak, self._used())
            except Exception:  # noqa: BLE001
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def summarise(rows: list[dict], batch: int, skip: int) -> dict:
    """Throughput over the rows after `skip` (each row covers log.every equal steps)."""
    kept = rows[skip:]
    out = {"rows_measured": len(kept), "peak_gib": max((r["memory_gib"] for r in rows), default=None)}
    if not kept:
        return out
    step_s = sum(r["step_s"] for r in kept) / len(kept)
    sps = batch / step_s
    r0 = kept[-1]
    out.update(step_s=step_s, samples_per_s=sps,
               tokens_per_s=sps * r0["tokens_per_s"] / r0["samples_per_s"],
               mfu=sps * r0["mfu"] / r0["samples_per_s"] if "mfu" in r0 else None,
               loss_last=r0.get("loss"), grad_norm_last=r0.get("grad_norm"))
    return out


def trainer_command(args, targets: str, batch: int, name: str, base: Path, run_root: Path) -> list[str]:
    cmd = [sys.executable, "-m", "trainer.train", *model_overrides(args), "data=synthetic",
           f"data.image_size={args.image_size}", f"data.text_len={args.text_len}", f"parallel={args.parallel}",
           f"device={args.device}", "stage=sft", f"checkpoint.init_from={base}", f"stage.steps={args.steps}",
           f"stage.global_batch_size={batch}", f"stage.micro_batch_size={batch}", f"log.every={args.log_every}",
           "checkpoint.every=1000", "log.tensorboard=false", f"name={name}", f"run_root={run_root}"]
    if TARGETS[targets] is not None:
        cmd += [f"stage.lora.rank={args.rank}", f"stage.lora.targets=[{','.join(TARGETS[targets])}]"]
    return cmd


def run_one(args, spec: str, base: Path, run_root: Path, time_left: float | None) -> dict:
    targets, _, b = spec.partition(":")
    batch = int(b)
    name = f"{targets}_b{batch}" + (f"_r{args.rank}" if TARGETS[targets] else "_full")
    run_dir = run_root / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    cmd = trainer_command(args, targets, batch, name, base, run_root)
    metrics = run_dir / "metrics.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = {"run": name, "targets": targets, "lora_targets": TARGETS[targets], "rank": args.rank if TARGETS[targets] else 0,
              "batch": batch, "command": " ".join(cmd[1:]), "status": "running"}
    log_path = run_root / f"{name}.out"
    t0 = time.perf_counter()
    with open(log_path, "w") as out, MemoryPoller() as mem:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = None
        while proc.poll() is None:
            time.sleep(0.5)
            if time_left is not None and time.perf_counter() - t0 > time_left:
                stopped = "deadline"
            elif TARGETS[targets] is None and any(r.get("step") == args.steps for r in read_rows(metrics)):
                stopped = "last row written"  # skip the full-weight final checkpoint
            if stopped:
                os.killpg(proc.pid, signal.SIGKILL)  # SIGKILL: SIGTERM would make the trainer checkpoint
                proc.wait()
        rc = proc.returncode
    result["wall_s"] = time.perf_counter() - t0
    result["returncode"] = rc
    result["status"] = ("stopped: " + stopped) if stopped else ("ok" if rc == 0 else "failed")
    if mem.peak is not None:
        result["nvml_peak_gib"] = mem.peak / 1024
        result["nvml_baseline_gib"] = mem.baseline / 1024
    text = log_path.read_text(errors="replace")
    m = re.search(r"model \S+: ([\d.]+)M parameters, ([\d.]+)M trained", text)
    if m:
        result["params_m"], result["trainable_m"] = float(m.group(1)), float(m.group(2))
    rows = read_rows(metrics)
    result["rows"] = rows
    result.update(summarise(rows, batch, args.skip_rows))
    if rc != 0 and not stopped:
        result["error_tail"] = text.splitlines()[-60:]
    if args.log:
        with open(args.log, "a") as f:
            f.write(f"===== {name} (rc {rc}, {result['wall_s']:.0f} s)\n$ {' '.join(cmd)}\n{text}\n")
    return result


def fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def print_table(record: dict) -> None:
    print(f"model {record['model']} | {record['image_size']}² | text {record['text_len']} | "
          f"{record['parallel']} | {record['steps']} steps, first {record['skip_rows']} rows dropped | "
          f"{record['machine'].get('nvidia_smi') or record['machine'].get('device')}")
    print(f"{'config':<22} {'batch':>5} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} "
          f"{'nvml GiB':>9} {'trainable':>10} {'wall s':>7}  status")
    for r in record["results"]:
        cfg = "full weights" if r["targets"] == "full" else f"LoRA r{r['rank']} {r['targets']}"
        trainable = f"{r['trainable_m']:.2f}M" if r.get("trainable_m") is not None else "-"
        print(f"{cfg:<22} {r['batch']:>5} {fmt(r.get('samples_per_s'), '.2f'):>10} "
              f"{fmt(r.get('tokens_per_s'), ',.0f'):>10} {fmt(r.get('mfu'), '.1f', 100):>6}% "
              f"{fmt(r.get('peak_gib'), '.1f'):>9} {fmt(r.get('nvml_peak_gib'), '.1f'):>9} {trainable:>10} "
              f"{r['wall_s']:>7.0f}  {r['status']}")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    work = Path(args.work)
    run_root = work / "runs"
    run_root.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args)
    base = Path(args.base) if args.base else work / f"base_{cfg.name}.safetensors"
    base_s = None
    if not base.exists():
        base_s = make_base(cfg, base)
        print(f"wrote random base {base} in {base_s:.0f} s", flush=True)
    from trainer.model import flops_per_sample

    side = args.image_size // 8 // cfg.patch_size
    record = {"model": cfg.name, "image_size": args.image_size, "text_len": args.text_len, "image_tokens": side * side,
              "parallel": args.parallel, "steps": args.steps, "log_every": args.log_every, "skip_rows": args.skip_rows,
              "flops_per_sample": flops_per_sample(cfg, args.text_len, side * side), "base_write_s": base_s,
              "machine": device_info(args.device), "args": vars(args), "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        left = args.deadline_s - (time.perf_counter() - start) if args.deadline_s else None
        if left is not None and left < args.min_run_s:
            print(f"skipped {spec}: {left:.0f} s left before the deadline", flush=True)
            record["results"].append({"run": spec, "targets": spec.split(":")[0], "batch": int(spec.split(":")[1]),
                                      "rank": args.rank, "status": "not run (deadline)", "wall_s": 0})
            continue
        r = run_one(args, spec, base, run_root, left)
        record["results"].append(r)
        out.write_text(json.dumps(record, indent=2) + "\n")  # after every run: a later failure loses nothing
        print(f"{r['run']}: {r['status']} in {r['wall_s']:.0f} s, {fmt(r.get('samples_per_s'), '.2f')} samples/s, "
              f"peak {fmt(r.get('peak_gib'), '.1f')} GiB, s/step by row "
              f"{[round(row['step_s'], 3) for row in r.get('rows', [])]}", flush=True)
        if r.get("error_tail"):
            print("\n".join(r["error_tail"][-40:]), flush=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
