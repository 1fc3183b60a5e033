"""The real training step on one GPU beside diffusers' compiled forward + backward, in one run.

A full step is `FlowStage.step` (trainer/stage.py) as the loop runs it: synthetic
batches made on the device (data/synthetic.py), the flow objective, backward,
grad clipping, AdamW, the fp32 EMA, with the model built by `build_dit` (per-block
compile, optional activation checkpointing, FSDP2 over a one-GPU mesh or plain
autocast). Variants change one setting at a time, so each change is measured against
the one before it in the same process:

    attention=sdpa|flex|cudnn|varlen|split   how the main blocks attend under the text key mask
                                 (unset: build_dit's choice, flex for compiled CUDA blocks)
    optim=foreach|fused          AdamW kernel; fused also skips non-finite steps on the
                                 device (no grad_norm.item() host sync per step)
    fsdp=0|1                     FSDP2 over a 1-GPU mesh (bf16 params) or fp32 params under autocast
    ac=none|full                 per-block activation checkpointing
    float8=0|1                   torchao float8 (tensorwise) training for the block linears
    concat=0|1                   q/k/v/gate and w_gate/w_up as one GEMM each (concat_weights)
    batch=N                      samples per step

The variant `diffusers` is diffusers' Krea2Transformer2DModel: a compiled forward +
backward of an MSE loss (benchmarks/train_step.py's measurement) at --diffusers-batch.
MFU = trainer.model.flops_per_sample × samples/s ÷ 989 TFLOP/s (no credit for recompute).

    python benchmarks/train_full_step.py                       # 2b, 1024², the default variants
    python benchmarks/train_full_step.py --variants "attention=flex,optim=fused"
    python benchmarks/train_full_step.py --kernels             # the attention kernels alone
    python benchmarks/train_full_step.py --loss-curve 300      # bf16 vs float8 losses, step by step
    python benchmarks/train_full_step.py --tiny --device cpu --variants "attention=sdpa,optim=foreach"
"""

import argparse
import gc
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch
from profiling import print_profile, profile_kernels
from train_step import build as build_reference
from train_step import load_config, make_batch, step as reference_step

import trainer.stage as stage_mod
from data.config import DataConfig
from data.sources import build_data
from trainer.config import OptimizerConfig, ParallelConfig, TrainConfig
from trainer.model import flops_per_sample
from trainer.parallel import Dist

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = [
    "attention=sdpa,optim=foreach",  # the trainer before this work (AC none)
    "diffusers",  # diffusers' compiled forward + backward (--diffusers-batch), no optimizer
    "attention=flex,optim=foreach",
    "attention=flex,optim=fused",
    "attention=cudnn,optim=fused",
    "attention=varlen,optim=fused",
    "attention=varlen,optim=fused,float8=1",
    "attention=varlen,optim=fused,fsdp=1",
    "attention=varlen,optim=fused,ac=full",
]
SETTINGS = {"attention": None, "optim": "fused", "fsdp": "0", "ac": "none", "float8": "0", "concat": "0", "batch": None}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b")
    p.add_argument("--tiny", action="store_true", help="tiny config and sequence, for a CPU smoke check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4, help="samples per step unless a variant says batch=N")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--valid-text", type=int, default=300)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", default=";".join(DEFAULT_VARIANTS), help="';'-separated, each 'key=value,...'")
    p.add_argument("--diffusers-batch", type=int, default=2, help="batch of the 'diffusers' variant; 0 skips it")
    p.add_argument("--kernels", action="store_true", help="time the attention kernels alone instead")
    p.add_argument("--loss-curve", type=int, default=0, help="N steps of bf16 and float8 from one init instead")
    p.add_argument("--budget-s", type=float, default=0, help="skip variants that would start after this many seconds")
    p.add_argument("--eager", action="store_true", help="no torch.compile (the loss curve needs none)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step of each variant: its top kernels and time by kind")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train_full_step.json"))
    a = p.parse_args()
    if a.tiny:
        a.image_size, a.text_len, a.valid_text, a.batch = 128, 16, 10, 2
        a.warmup, a.steps, a.diffusers_batch = 1, 2, min(a.diffusers_batch, 2)
    a.compile = not (a.tiny or a.eager)
    return a


def parse_variant(text: str, a) -> dict:
    v = dict(SETTINGS, batch=str(a.batch))
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise ValueError(f"--variants: unknown setting {key!r} in {text!r} (settings: {sorted(SETTINGS)})")
        v[key] = value
    return v


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def one_gpu_mesh(device: torch.device) -> Dist:
    """A Dist with a one-rank device mesh, so build_dit applies FSDP2 as on many GPUs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return Dist(0, 1, 0, device, init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",)))


def train_config(model_cfg, a, v: dict) -> TrainConfig:
    batch = int(v["batch"])
    cfg = TrainConfig(model=model_cfg, device=a.device)
    layers = list(range(1, model_cfg.num_text_layers + 1))
    cfg.data = DataConfig(name="synthetic", image_size=a.image_size, text_len=a.text_len, text_layers=layers,
                          synthetic_valid_text=a.valid_text / a.text_len)
    cfg.stage.steps, cfg.stage.global_batch_size, cfg.stage.micro_batch_size = 10**6, batch, batch
    cfg.optimizer = OptimizerConfig(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.01)
    cfg.parallel = ParallelConfig(param_dtype="bfloat16" if torch.device(a.device).type == "cuda" else "float32",
                                  activation_checkpoint=v["ac"], compile=a.compile, float8=v["float8"] == "1")
    return cfg


def foreach_adamw(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same parameter groups and hyperparameters under the foreach kernel (the trainer's before)."""
    d = opt.defaults
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], foreach=True)


def build_stage(model_cfg, a, v: dict):
    device = torch.device(a.device)
    cfg = train_config(model_cfg, a, v)
    d = one_gpu_mesh(device) if v["fsdp"] == "1" else Dist(0, 1, 0, device, None)
    data = build_data(cfg.data, "/tmp/k2_full_step_assets", cfg.stage.micro_batch_size, 0, 1, device,
                      model_cfg.text_dim)
    stage = stage_mod.FlowStage(cfg, d, data, None)  # float8 through parallel.float8, as the trainer does
    if v["attention"]:  # else build_dit's choice: flex for compiled CUDA blocks, dense otherwise
        stage.model.attention = v["attention"]
    if v["concat"] == "1":
        from trainer.model.layers import Attention, SwiGLU

        for m in stage.model.modules():
            if isinstance(m, (Attention, SwiGLU)):
                m.concat_weights = True
    t = stage.trainables["model"]
    if v["optim"] == "foreach":
        t.optimizer = foreach_adamw(t.optimizer)
    elif not stage_mod.skips_on_device(t.optimizer):
        raise ValueError("optim=fused needs parameters on CUDA")
    return stage, cfg


def run_variant(model_cfg, a, text: str) -> dict:
    v = parse_variant(text, a)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch._dynamo.reset()  # each variant compiles its own blocks (the on-disk kernel cache stays)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    stage, cfg = build_stage(model_cfg, a, v)
    t0 = time.perf_counter()
    for i in range(a.warmup):
        values = stage.step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.steps):
        values = stage.step(a.warmup + i)
    sync(device)
    seconds = (time.perf_counter() - t0) / a.steps
    batch = int(v["batch"])
    side = a.image_size // 8 // model_cfg.patch_size
    flops = flops_per_sample(model_cfg, a.text_len, side * side)
    sps = batch / seconds
    result = {
        "variant": text, "settings": v, "step_s": seconds, "samples_per_s": sps,
        "tokens_per_s": sps * (a.text_len + side * side), "mfu": flops * sps / (a.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "warmup_s": warm_s, "loss": float(values["loss"]), "grad_norm": float(values["grad_norm"]),
        "skipped": bool(values["skipped"]),
    }
    if a.profile:
        rows, summary = profile_kernels(functools.partial(stage.step, a.warmup + a.steps), device, top=20)
        print_profile(rows, summary)
        result["profile"] = {**summary, "top_kernels": rows}
    del stage, values
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_diffusers(model_cfg, a) -> dict:
    """benchmarks/train_step.py's compiled forward + backward of diffusers' model."""
    ref = argparse.Namespace(batch=a.diffusers_batch, image_size=a.image_size, text_len=a.text_len,
                             valid_text=a.valid_text)
    device, dtype = torch.device(a.device), torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    cuda = device.type == "cuda"
    torch._dynamo.reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_reference("diffusers", model_cfg, device, dtype, a.compile)
    batch = make_batch(model_cfg, ref, device, dtype)
    for _ in range(a.warmup):
        reference_step("diffusers", model, batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        reference_step("diffusers", model, batch)
    sync(device)
    seconds = (time.perf_counter() - t0) / a.steps
    side = a.image_size // 8 // model_cfg.patch_size
    sps = a.diffusers_batch / seconds
    flops = flops_per_sample(model_cfg, a.text_len, side * side)
    out = {"variant": "diffusers Krea2Transformer2DModel, compiled fwd+bwd (no optimizer)", "step_s": seconds,
           "samples_per_s": sps, "tokens_per_s": sps * (a.text_len + side * side),
           "mfu": flops * sps / (a.peak_tflops * 1e12),
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    del model, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def time_cuda(fn, reps: int = 10) -> float:
    """Median milliseconds of `fn` over `reps` calls, CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernels(model_cfg, a) -> list[dict]:
    """The main blocks' attention alone at the step's shape: each kernel's forward and
    forward + backward, and its error against the dense masked SDPA in float32 over the
    valid rows (output and dq at valid queries, dk and dv at valid keys).

    Rows are laid out [image | valid text | padding], the varlen layout; the masks of the
    other kernels name the same keys."""
    from trainer.model.attention import Cudnn, attend, key_padding, split_key_padding, varlen_segments

    device = torch.device(a.device)
    side = a.image_size // 8 // model_cfg.patch_size
    B, H, G, K = a.batch, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim
    L, T = side * side, a.text_len
    S = L + T
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, n, S, K, device=device, generator=gen, dtype=torch.bfloat16) for n in (H, G, G))
    valid_BT = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b in range(B):  # rows differ, as in a real batch
        valid_BT[b, :a.valid_text if b % 2 == 0 else a.valid_text // 2] = True
    valid_BS = torch.cat((valid_BT.new_ones(B, L), valid_BT), dim=1)
    rows_B1S1 = valid_BS[:, None, :, None]
    # No gradient reaches padded queries in the model (nothing reads their outputs), so none
    # here either: varlen lets them attend among themselves, which would change dk and dv.
    dout = torch.randn(B, H, S, K, device=device, generator=gen, dtype=torch.bfloat16) * rows_B1S1

    def grads(fn, dtype):
        xs = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(dout.to(dtype))
        return [t.float() * rows_B1S1 for t in (out.detach(), *(x.grad for x in xs))]

    ref = grads(lambda q_, k_, v_: attend(q_, k_, v_, key_padding(valid_BS, "sdpa")), torch.float32)
    cases = {
        "sdpa dense mask (efficient kernel, K/V repeated)": lambda: key_padding(valid_BS, "sdpa"),
        "flex block mask (GQA in kernel)": lambda: key_padding(valid_BS, "flex"),
        "cudnn mask (enable_gqa)": lambda: key_padding(valid_BS, "cudnn"),
        "varlen flash, valid/padding segments": lambda: varlen_segments(valid_BT, L),
        "split: flash over image keys + masked text keys, merged": lambda: split_key_padding(valid_BT),
        "flash, no mask (ceiling: not the masked function)": lambda: None,
        "cudnn, no mask (ceiling: not the masked function)": lambda: Cudnn(None),
    }
    to_split = torch.cat((torch.arange(L, S), torch.arange(L))).to(device)
    from_split = torch.argsort(to_split)
    fwd_flops = 4.0 * B * H * S * S * K
    rows = []
    for name, make_mask in cases.items():
        row = {"kernel": name}
        try:
            mask = make_mask()
            fn = lambda q_, k_, v_: attend(q_, k_, v_, mask)  # noqa: E731
            if name.startswith("split"):  # its layout is [text | image]: the rows permuted there and back
                fn = lambda q_, k_, v_: attend(q_[:, :, to_split], k_[:, :, to_split], v_[:, :, to_split],  # noqa: E731
                                               mask)[:, :, from_split]
            got = grads(fn, torch.bfloat16)
            if "ceiling" not in name:
                row["rel_err"] = [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)]  # out, dq, dk, dv
            qs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            with torch.no_grad():
                row["fwd_ms"] = time_cuda(lambda: fn(q, k, v))

            def fwd_bwd():
                fn(*qs).backward(dout)

            row["fwd_bwd_ms"] = time_cuda(fwd_bwd)
            row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # a kernel the installed torch lacks: say so, time the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def loss_curve(model_cfg, a) -> dict:
    """`--loss-curve N` steps of bf16 and of float8 block linears from the same init and
    batches; the per-step losses and their windowed relative gap."""
    curves = {}
    for name, text in (("bf16", "optim=fused"), ("float8", "optim=fused,float8=1")):
        v = parse_variant(text, a)
        stage, _ = build_stage(model_cfg, a, v)
        losses = [stage.step(i)["loss"] for i in range(a.loss_curve)]
        curves[name] = torch.stack(losses).float().cpu().tolist()
        del stage, losses
        gc.collect()
        torch.cuda.empty_cache()
    window = max(1, a.loss_curve // 10)
    bf, f8 = torch.tensor(curves["bf16"]), torch.tensor(curves["float8"])
    n = a.loss_curve // window * window
    mb, m8 = bf[:n].view(-1, window).mean(1), f8[:n].view(-1, window).mean(1)
    gap = ((m8 - mb).abs() / mb).tolist()
    print(f"loss windows of {window} steps, bf16: {[round(x, 4) for x in mb.tolist()]}")
    print(f"                      float8: {[round(x, 4) for x in m8.tolist()]}")
    print(f"relative gap per window: {[round(x, 4) for x in gap]}; max {max(gap):.4f}")
    return {"steps": a.loss_curve, "window": window, "losses": curves, "window_means": {"bf16": mb.tolist(),
            "float8": m8.tolist()}, "relative_gap": gap, "max_relative_gap": max(gap)}


def main() -> None:
    a = parse_args()
    cfg = load_config(argparse.Namespace(tiny=a.tiny, model=a.model))
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    side = a.image_size // 8 // cfg.patch_size
    record = {"args": vars(a), "model": cfg.name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else platform.processor(),
              "image_tokens": side * side, "flops_per_sample": flops_per_sample(cfg, a.text_len, side * side)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(record, indent=2) + "\n")

    if a.kernels:
        record["kernels"] = kernels(cfg, a)
        save()
        return
    if a.loss_curve:
        record["loss_curve"] = loss_curve(cfg, a)
        save()
        return
    start = time.perf_counter()
    record["results"] = rows = []
    jobs = [(text, lambda text=text: run_diffusers(cfg, a) if text == "diffusers" else run_variant(cfg, a, text))
            for text in a.variants.split(";") if text and (text != "diffusers" or a.diffusers_batch)]
    for text, job in jobs:
        if a.budget_s and time.perf_counter() - start > a.budget_s:
            rows.append({"variant": text, "error": "not run: --budget-s spent"})
            continue
        try:
            rows.append(job())
        except Exception as e:
            rows.append({"variant": text, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            gc.collect()
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
        save()

    print(f"model {cfg.name} | {a.text_len} text ({a.valid_text} valid) + {side * side} image tokens | {a.device}")
    print(f"{'variant':<52} {'step s':>7} {'samples/s':>9} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<52} {r['error'][:80]}")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['variant'][:52]:<52} {r['step_s']:>7.3f} {r['samples_per_s']:>9.2f} {r['tokens_per_s']:>9.0f} "
              f"{100 * r['mfu']:>5.1f}% {mem:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
