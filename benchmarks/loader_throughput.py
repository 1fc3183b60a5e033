"""Shard loader throughput on synthetic 1024² shards (no encoders).

Writes random float16 arrays shaped like Krea-2-class 1024² samples (Qwen-Image
latents 16 x h x w over three 1024² buckets; text features of ~300 valid tokens x
12 layers x 2560) through the writer's own tar/marker/index code path, then reads
a fixed number of batches with the ShardLoader at each worker count and reports
samples/s, the stored MB/s read from the shards, and the MB/s of float32 batches
handed to the trainer (text padded to 512 tokens).

    python benchmarks/loader_throughput.py                  # ~2.4 GB in /tmp, about a minute
    python benchmarks/loader_throughput.py --samples 32     # quicker

The shards were just written, so they are read from the page cache: this measures
the loader's CPU work (parse, float16 -> float32, padding, worker -> trainer
transfer), not the disk.
"""

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from data.buckets import Buckets
from data.shard_loader import ShardLoader
from data.writer import FORMAT, build_index, write_done, write_empty_text, write_tar

ROOT = Path(__file__).resolve().parents[1]
LAYERS = list(range(2, 36, 3))  # Krea 2's 12 taps of Qwen3-VL-4B
DIM, TEXT_LEN, SUFFIX = 2560, 512, 5


def write_synthetic(out: str, samples: int, per_shard: int, valid_tokens: int, seed: int) -> float:
    """Random samples through write_tar / write_done / build_index; returns the seconds it took."""
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    buckets = Buckets(1024, 64)
    # Three buckets of the 1024² family (portrait, square, landscape).
    used = [buckets.sizes.index(s) for s in [(1344, 768), (1024, 1024), (768, 1344)]]
    meta = {"format": FORMAT, "latents": {"kind": "qwen_image", "channels": 16, "downsample": 8},
            "text": {"layers": LAYERS, "dim": DIM, "max_len": TEXT_LEN, "suffix": SUFFIX, "model": "synthetic"},
            "buckets": [list(s) for s in buckets.sizes], "repa": None}
    rng = np.random.default_rng(seed)
    write_empty_text(out, rng.standard_normal((SUFFIX, len(LAYERS), DIM), np.float32))
    for c, start in enumerate(range(0, samples, per_shard)):
        def gen():
            for i in range(start, min(samples, start + per_shard)):
                bucket = used[i % len(used)]
                h, w = buckets[bucket]
                n = valid_tokens + int(rng.integers(-40, 41))
                arrays = {"latent": rng.standard_normal((16, h // 8, w // 8), np.float32).astype(np.float16),
                          "text": rng.standard_normal((n, len(LAYERS), DIM), np.float32).astype(np.float16)}
                record = {"caption": f"synthetic sample {i}", "source": f"synthetic/{i}", "bucket": [h, w]}
                yield f"c{c:06d}-{i - start:06d}", record, arrays, bucket

        name = f"chunk-{c:06d}"
        shard = write_tar(os.path.join(out, f"{name}-0000.tar"), gen())
        write_done(out, name, [shard], [], meta, shard["samples"])
    build_index(out)
    return time.perf_counter() - t0


def measure(out: str, num_workers: int, batch_size: int, batches: int, warmup: int) -> dict:
    loader = ShardLoader(out, batch_size, text_len=TEXT_LEN, num_workers=num_workers, prefetch=2,
                         caption_dropout=0.1)
    sizes = loader.index.size
    for _ in range(warmup):  # worker start-up and first reads are not the steady state
        next(loader)
    stored = handed = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
        stored += int(sizes[batch.sample_ids.numpy() % loader.index.total].sum())
        handed += sum(t.numel() * t.element_size() for t in (batch.latents, batch.text, batch.text_mask))
    seconds = time.perf_counter() - t0
    loader.close()
    return {"num_workers": num_workers, "batches": batches, "batch_size": batch_size, "seconds": round(seconds, 2),
            "samples_per_s": round(batches * batch_size / seconds, 2),
            "stored_MB_per_s": round(stored / seconds / 1e6, 1),
            "batch_MB_per_s": round(handed / seconds / 1e6, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/k2train_loader_bench")
    p.add_argument("--samples", type=int, default=128, help="~19 MB each")
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--valid-tokens", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    p.add_argument("--keep", action="store_true", help="leave the shards in --out")
    p.add_argument("--result", default=str(ROOT / "benchmarks/results/loader_throughput.json"))
    args = p.parse_args()

    write_s = write_synthetic(args.out, args.samples, args.per_shard, args.valid_tokens, seed=0)
    on_disk = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"wrote {args.samples} samples ({on_disk / 1e9:.2f} GB) in {write_s:.1f}s to {args.out}")
    runs = []
    for workers in args.workers:
        r = measure(args.out, workers, args.batch_size, args.batches, args.warmup)
        runs.append(r)
        print(f"num_workers={workers}: {r['samples_per_s']} samples/s | {r['stored_MB_per_s']} MB/s stored | "
              f"{r['batch_MB_per_s']} MB/s of float32 batches | {r['batches']} batches in {r['seconds']}s")
    result = {"what": "ShardLoader, synthetic 1024² shards (page cache), text padded to 512 x 12 x 2560 float32",
              "samples": args.samples, "bytes_on_disk": on_disk, "write_seconds": round(write_s, 1),
              "valid_tokens": args.valid_tokens, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "runs": runs}
    os.makedirs(os.path.dirname(args.result), exist_ok=True)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
