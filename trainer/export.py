"""Export a run's weights for inference elsewhere.

    python -m trainer.export runs/base --to diffusers --out out/transformer          # EMA weights, fp32
    python -m trainer.export runs/base --to release --dtype bfloat16 --out k2.safetensors
    python -m trainer.export runs/pink --to lora-comfyui --out pink_comfy.safetensors  # a LoRA run's adapter
    python -m trainer.export runs/pink --to diffusers --merge-lora --out out/pink     # adapter merged onto its base
    python -m trainer.export /models/krea-2-raw --to release --out k2.safetensors      # format conversion
    python -m trainer.export runs/base --to diffusers --lora style.safetensors:0.7 --out out/styled

--to: diffusers (a Krea2Transformer2DModel folder), release (the Krea 2 release file, which
ComfyUI loads), lora-diffusers / lora-comfyui / lora (k2train naming): see trainer/lora_io.py.

Outputs are written under `<out>.partial` and renamed into place when complete, so a
killed export never leaves something at `--out` that looks finished.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.checkpoint import read_models, resolve_checkpoint
from trainer.lora_io import parse_lora, read_lora, write_lora
from trainer.model import save_pretrained

TARGETS = ("diffusers", "release", "lora-diffusers", "lora-comfyui", "lora")
LORA_FORMATS = {"lora-diffusers": "diffusers", "lora-comfyui": "comfyui", "lora": "k2train"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lora_run_info(source: str, name: str = "model") -> tuple[str | None, dict | None]:
    """(checkpoint folder, its models.json LoRA entry): (None, None) for released weights,
    (step_dir, None) for a full-weights k2train checkpoint."""
    step_dir = resolve_checkpoint(source)
    if step_dir is None:
        return None, None
    return step_dir, read_models(step_dir).get(name, {}).get("lora") or None


def export(source: str, to: str, out: str, which: str = "ema", merge_lora: bool = False,
           loras: list[tuple[str, float]] = (), dtype: str = "float32") -> Path:
    """Writes `source` (k2train run/checkpoint, diffusers folder, release file) as `to` at `out`."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose from {TARGETS}")
    if which not in ("ema", "model"):
        raise ValueError(f"--weights {which!r}: choose 'ema' or 'model'")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {tuple(DTYPES)}")
    if not os.path.exists(source):
        raise ValueError(f"{source} does not exist (expected a k2train run or checkpoint, a diffusers folder or a "
                         f"release .safetensors file)")
    out_path = Path(out)
    if to != "diffusers" and out_path.suffix != ".safetensors":
        raise ValueError(f"--out {out}: --to {to} writes one file; give it a .safetensors name")
    if to == "diffusers" and out_path.exists():
        raise ValueError(f"--out {out} already exists; remove it or choose another folder")
    step_dir, lora = lora_run_info(source)
    if to in LORA_FORMATS:
        return _export_adapter(source, step_dir, lora, to, out_path, which, merge_lora, loras, DTYPES[dtype])
    if lora and not merge_lora:
        raise ValueError(f"{step_dir} is a LoRA run (rank {lora['rank']}): its checkpoint holds only the adapter. "
                         f"Pass --merge-lora to export it merged onto its base, or export the adapter itself "
                         f"with --to lora-diffusers, lora-comfyui or lora")
    from trainer.weights import load_weights

    _check_loras_early(source, step_dir, loras)
    model = load_weights(source, which, list(loras))
    partial = out_path.with_name(out_path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export
    try:
        if to == "diffusers":
            save_pretrained(model, partial, "diffusers", dtype=DTYPES[dtype])
            os.rename(partial, out_path)
        else:
            written = save_pretrained(model, partial, "release", dtype=DTYPES[dtype])  # partial/model.safetensors
            os.replace(written, out_path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_path


def _check_loras_early(source: str, step_dir: str | None, loras) -> None:
    """Reads every --lora file against the source's model config before the (possibly
    12B-parameter) weights load, when that config is known without them."""
    if not loras:
        return
    cfg = None
    if step_dir is not None:
        from trainer.weights import checkpoint_model_config

        cfg = checkpoint_model_config(step_dir)
    elif os.path.isfile(os.path.join(source, "config.json")):
        import json

        from trainer.model.interop import config_from_diffusers

        with open(os.path.join(source, "config.json")) as f:
            cfg = config_from_diffusers(json.load(f), name=os.path.basename(os.path.normpath(source)))
    if cfg is not None:
        for path, _ in loras:
            read_lora(path, cfg)


def _export_adapter(source, step_dir, lora, to, out_path, which, merge_lora, loras, dtype) -> Path:
    if step_dir is None:
        raise ValueError(f"{source} is not a k2train checkpoint: --to {to} exports the adapter of a LoRA run")
    if lora is None:
        raise ValueError(f"{step_dir} is a full-weights run, not a LoRA run: it has no adapter to export "
                         f"(export its weights with --to diffusers or --to release)")
    if merge_lora or loras:
        raise ValueError(f"--to {to} writes the run's adapter alone; --merge-lora and --lora apply to "
                         f"--to diffusers / release")
    from trainer.weights import lora_adapters

    sd = {k: v.to(dtype) for k, v in lora_adapters(step_dir, which).items()}
    return write_lora(sd, float(lora["alpha"]), int(lora["rank"]), out_path, LORA_FORMATS[to])


def describe(path: Path) -> str:
    """`path (N tensors, size)` of a written file or diffusers folder."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    count = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            count += len(fh.keys())
    size = sum(f.stat().st_size for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file())
    return f"{path} ({count} tensors, {_human(size)})"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="RUN_OR_CKPT",
                   help="a k2train run, checkpoints/ folder or step folder; or a diffusers folder / release file")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--out", required=True, help="a folder (--to diffusers) or a .safetensors file")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA or live weights of a checkpoint")
    p.add_argument("--merge-lora", action="store_true", help="export a LoRA run merged onto its base")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA file (k2train, diffusers or ComfyUI naming) at SCALE (default 1); repeatable")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    args = p.parse_args(argv)
    try:
        path = export(args.source, args.to, args.out, args.weights, args.merge_lora,
                      [parse_lora(a) for a in args.lora], args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {describe(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
