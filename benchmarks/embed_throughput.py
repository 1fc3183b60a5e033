"""Image-embedding throughput of an open_clip ViT-B/16 (random weights) at a few batch sizes.

    PYTHONPATH=$PWD python benchmarks/embed_throughput.py --device cuda        # one H200: batch 64 and 256
    PYTHONPATH=$PWD python benchmarks/embed_throughput.py --device cpu --batches 2 --warmup 1 --batch-sizes 8 16

Two numbers per batch size, images/s:

    tower       the image tower's forward on already-preprocessed (B, 3, 224, 224) pixels on
                the device: what the accelerator can do (bf16 autocast on CUDA, fp32 on CPU)
    end_to_end  data.embeddings' embedder on uint8 256x256 RGB images: open_clip's own PIL
                transform on the host (resize, crop, normalise, one process), the copy to the
                device, the forward, L2 normalisation and the copy back

Where end_to_end falls far below tower, the host-side transform is the limit and a job
should split its images over more processes per GPU. Weights are random (pretrained=None):
the speed of a tower does not depend on its values. Needs only torch, open_clip and numpy.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from data.embeddings import build_embedder

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_tower(embedder, batch_size: int, batches: int, warmup: int) -> float:
    """Seconds per batch of the tower's forward on random preprocessed pixels."""
    device = embedder.device
    h, w = embedder.settings["image_size"]
    pixels = torch.randn(batch_size, 3, h, w, device=device)
    use_amp = device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        for _ in range(warmup):
            embedder.tower(pixels)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            embedder.tower(pixels)
        sync(device)
    return (time.perf_counter() - t0) / batches


def time_end_to_end(embedder, batch_size: int, batches: int, warmup: int, image_size: int) -> float:
    """Seconds per batch of embedder(images) on random uint8 images of image_size^2."""
    images = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    embedder.batch_size = batch_size
    for _ in range(warmup):
        embedder(images)
    t0 = time.perf_counter()
    for _ in range(batches):
        embedder(images)  # returns on the CPU: the device work is done when it returns
    return (time.perf_counter() - t0) / batches


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=256, help="side of the uint8 images given end to end")
    p.add_argument("--skip-end-to-end", action="store_true", help="time the tower only")
    p.add_argument("--result", default=None,
                   help="JSON path (default: benchmarks/results/embed_throughput_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    embedder = build_embedder("open_clip", args.model, device=device, amp=device.type == "cuda")
    params = sum(t.numel() for t in embedder.tower.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{embedder.name} ({params / 1e6:.1f} M parameters in the image tower, {embedder.dim}-d) on {device_name}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {torch.get_num_threads()} torch threads")
    runs = []
    print(f"{'batch':>6} | {'tower img/s':>12} | {'end-to-end img/s':>16} | {'peak GiB':>8}")
    for batch_size in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tower_s = time_tower(embedder, batch_size, args.batches, args.warmup)
        run = {"batch_size": batch_size, "tower_images_per_s": round(batch_size / tower_s, 1),
               "tower_ms_per_batch": round(1e3 * tower_s, 2)}
        if not args.skip_end_to_end:
            e2e_s = time_end_to_end(embedder, batch_size, args.batches, args.warmup, args.image_size)
            run.update(end_to_end_images_per_s=round(batch_size / e2e_s, 1), end_to_end_ms_per_batch=round(1e3 * e2e_s, 2))
        if device.type == "cuda":
            run["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        runs.append(run)
        print(f"{batch_size:>6} | {run['tower_images_per_s']:>12.1f} | {run.get('end_to_end_images_per_s', '-'):>16} | "
              f"{run.get('peak_memory_GiB', '-'):>8}")
    result = {"what": f"open_clip {args.model} image tower, random weights: forward on preprocessed pixels (tower) "
                      f"and data.embeddings end to end from uint8 {args.image_size}px images",
              "model": args.model, "device": str(device),
              "device_name": device_name,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "batches": args.batches, "warmup": args.warmup, "tower_parameters": params,
              "torch": torch.__version__, "open_clip": open_clip.__version__, "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "runs": runs}
    out = Path(args.result or ROOT / f"benchmarks/results/embed_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
