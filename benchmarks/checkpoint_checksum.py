"""What checksums add to a checkpoint: write, record, verify and load times of the real
`trainer.checkpoint.Checkpointer` on a full-weight run's state.

The state is that of a `trainer.train` run of `--model` on one process: fp32 weights
(the one-GPU layout), AdamW moments after one step, and the fp32 EMA — ~34 GB for
`2b`. The save is timed whole (DCP write with fsync + checksums.json), the checksum
pass on its own (hashing the files just written, mostly from the page cache) and again
after dropping the page cache when that is allowed (a restart on a fresh node reads
from disk); verify is what a restart runs before loading.

    python benchmarks/checkpoint_checksum.py                    # 2b on cuda
    python benchmarks/checkpoint_checksum.py --model tiny --device cpu
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", default="/tmp/k2_ckpt_bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_checksum.json"))
    args = p.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from trainer import checksums
    from trainer.checkpoint import Checkpointer, TrainState
    from trainer.parallel import init_distributed
    from trainer.stage import Trainable, build_dit
    from trainer.train import to_config

    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = to_config(compose("train", [f"model={args.model}", f"device={args.device}", "name=bench"]))
    d = init_distributed(cfg.parallel, cfg.device)
    model, info = build_dit(cfg, d)
    t = Trainable.create(model, cfg, info)
    for q in model.parameters():  # one AdamW step creates the moments
        q.grad = torch.zeros_like(q)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    n_params = sum(q.numel() for q in model.parameters())

    shutil.rmtree(args.work, ignore_errors=True)
    ckpt = Checkpointer(args.work, cfg.checkpoint, d)
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ckpt.save(TrainState(step=1), {"model": t}, {}, {"model": info})
    save_s = time.perf_counter() - t0
    step_dir = ckpt.path(1)
    size = sum(os.path.getsize(os.path.join(step_dir, n)) for n in os.listdir(step_dir))

    t0 = time.perf_counter()
    checksums.record(step_dir)
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    problems = checksums.verify(step_dir)
    verify_s = time.perf_counter() - t0
    assert not problems, problems
    cold_s = None
    try:  # a restart on another node reads from disk, not from this page cache
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        t0 = time.perf_counter()
        checksums.verify(step_dir)
        cold_s = time.perf_counter() - t0
    except OSError:
        pass
    t0 = time.perf_counter()
    ckpt.load(1, {"model": t}, {})
    sync()
    load_s = time.perf_counter() - t0

    rows = {
        "model": args.model, "parameters": n_params, "checkpoint_bytes": size, "threads": checksums.default_threads(),
        "save_s": save_s, "record_s": record_s, "verify_s": verify_s, "verify_cold_s": cold_s, "load_s": load_s,
        "record_share_of_save": record_s / save_s, "verify_share_of_load": verify_s / load_s,
        "machine": f"{platform.node()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name()}" if d.device.type == "cuda" else ""),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{args.model}: {n_params / 1e9:.2f}B parameters, checkpoint {size / 1e9:.1f} GB, "
          f"{rows['threads']} hashing threads")
    print("| what | seconds | GB/s |")
    print("| --- | ---: | ---: |")
    for what, key in [("save (DCP write + fsync + checksums)", "save_s"), ("checksums alone (warm)", "record_s"),
                      ("verify (warm)", "verify_s"), ("verify (page cache dropped)", "verify_cold_s"),
                      ("load", "load_s")]:
        if rows[key] is not None:
            print(f"| {what} | {rows[key]:.2f} | {size / rows[key] / 1e9:.2f} |")
    print(f"checksums: {100 * rows['record_share_of_save']:.1f}% of the save; "
          f"verify: {100 * rows['verify_share_of_load']:.1f}% of the load")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
