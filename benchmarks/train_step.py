"""Training-step throughput of K2DiT against diffusers' Krea2Transformer2DModel, same config.

Forward + backward of a dummy MSE loss, bf16 weights, no optimizer (the step
cost that the model code controls). Default: the 2b config at 1024² (4096
image tokens after VAE f8 + patch 2) with 512 text tokens of which 300 are
valid, batch 2.

    python benchmarks/train_step.py                        # eager, both implementations
    python benchmarks/train_step.py --compile              # every block torch.compile'd
    python benchmarks/train_step.py --tiny --device cpu    # smoke check on a laptop
"""

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from trainer.model import K2DiT, ModelConfig, flops_per_sample, positions
from trainer.model.interop import config_to_diffusers

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b", help="name of configs/model/<name>.yaml")
    p.add_argument("--tiny", action="store_true", help="tiny config and sequence, for a CPU smoke check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=1024, help="pixels; tokens per side = size / 8 / patch")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--valid-text", type=int, default=300, help="valid (unpadded) text tokens per sample")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (main + text fusion)")
    p.add_argument("--impl", default="both", choices=["both", "k2", "diffusers"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train_step.json"))
    args = p.parse_args()
    if args.tiny:
        args.image_size, args.text_len, args.valid_text = 128, 16, 10
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 3)
    return args


def tiny_config() -> ModelConfig:
    return ModelConfig(
        name="tiny", latent_channels=16, patch_size=2, dim=128, num_blocks=2, num_heads=4, num_kv_heads=2,
        mlp_hidden=256, timestep_dim=64, text_dim=64, num_text_layers=3, text_num_heads=2, text_num_kv_heads=2,
        text_mlp_hidden=128, rope_axes=[8, 12, 12],
    )  # fmt: skip


def load_config(args) -> ModelConfig:
    if args.tiny:
        return tiny_config()
    path = ROOT / "configs/model" / f"{args.model}.yaml"
    if not path.exists():
        raise ValueError(f"no model config {path}")
    cfg = ModelConfig(**yaml.safe_load(path.read_text()))
    cfg.validate()
    return cfg


def build(impl: str, cfg: ModelConfig, device, dtype, compile_blocks: bool) -> torch.nn.Module:
    if impl == "k2":
        model = K2DiT(cfg)
        model.init_weights(0)
        block_lists = [model.blocks, model.text_fusion.layerwise, model.text_fusion.refiner]
    else:
        from diffusers import Krea2Transformer2DModel
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # its cast warning: we re-float the norms below
        model = Krea2Transformer2DModel(**config_to_diffusers(cfg))
        fusion = model.text_fusion
        block_lists = [model.transformer_blocks, fusion.layerwise_blocks, fusion.refiner_blocks]
    model = model.to(device=device, dtype=dtype).train()
    if impl == "diffusers":
        # What from_pretrained(torch_dtype=bf16) does: diffusers keeps its norm weights in fp32.
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in model._keep_in_fp32_modules:
                module.float()
    if compile_blocks:
        for blocks in block_lists:
            for i, block in enumerate(blocks):
                blocks[i] = torch.compile(block)
    return model


def make_batch(cfg: ModelConfig, args, device, dtype):
    side = args.image_size // 8 // cfg.patch_size
    B, T, L = args.batch, args.text_len, side * side
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, : args.valid_text] = True
    return dict(
        x=randn(B, L, cfg.in_channels),
        text=randn(B, T, cfg.num_text_layers, cfg.text_dim),
        t=torch.rand(B, generator=gen).to(device),
        pos=positions(T, side, side, device=device),
        mask=mask.to(device),
        target=randn(B, L, cfg.in_channels),
    )


def step(impl: str, model, b) -> None:
    if impl == "k2":
        v = model(b["x"], b["text"], b["t"], b["pos"], b["mask"])
    else:
        v = model(b["x"], b["text"], b["t"], b["pos"].float(), b["mask"]).sample
    F.mse_loss(v.float(), b["target"].float()).backward()
    model.zero_grad(set_to_none=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run(impl: str, cfg: ModelConfig, args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build(impl, cfg, device, dtype, args.compile)
    batch = make_batch(cfg, args, device, dtype)
    for _ in range(args.warmup):
        step(impl, model, batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(impl, model, batch)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps

    L = batch["x"].shape[1]
    samples_per_s = args.batch / seconds
    flops = flops_per_sample(cfg, args.text_len, L)
    result = {
        "impl": impl,
        "step_ms": seconds * 1e3,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * (args.text_len + L),
        "mfu": flops * samples_per_s / (args.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "params": sum(p.numel() for p in model.parameters()),
    }
    del model, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args()
    cfg = load_config(args)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    impls = ["k2", "diffusers"] if args.impl == "both" else [args.impl]
    side = args.image_size // 8 // cfg.patch_size
    results = [run(impl, cfg, args) for impl in impls]

    header = f"{'impl':<10} {'step ms':>9} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}"
    print(f"model {cfg.name} | batch {args.batch} | {args.text_len} text ({args.valid_text} valid) + "
          f"{side * side} image tokens | {args.dtype} | compile={args.compile} | {args.device}")  # fmt: skip
    print(header)
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['impl']:<10} {r['step_ms']:>9.1f} {r['samples_per_s']:>10.2f} "
              f"{r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% {mem:>9}")  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (platform.processor() or "cpu")
    record = {
        "args": vars(args),
        "model": cfg.name,
        "device": device_name,
        "torch": torch.__version__,
        "image_tokens": side * side,
        "flops_per_sample": flops_per_sample(cfg, args.text_len, side * side),
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
