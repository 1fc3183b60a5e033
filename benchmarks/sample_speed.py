"""Turbo sampling latency: 8 Euler steps without guidance, batch 1, one GPU.

The same random weights (every parameter drawn, so the blocks are not the identity)
run four ways, each in trainer.flow.euler_sample from the same noise and text:

    plain      K2DiT bf16, blocks compiled, the prompt padded to --text-len with its mask
               (dense masked SDPA): the sampler before this work
    fast       trainer.sample.fast_sampling: padding dropped (trim_padding, exact), flash
               attention without a mask, q/k/v/gate and w_gate/w_up fused, the text path run
               once (not per step), blocks compiled
    float8     fast + float8 block linears (torchao; --float8 row: a scale per weight row and
               activation token, --float8 tensor: one per tensor)
    float8-fused float8 per-row, each linear's input made and quantised by one fused row kernel
               (trainer/model/fp8_kernels.py) instead of torchao's quantisation
    diffusers  Krea2Transformer2DModel with the same weights, blocks compiled, the padded
               prompt and mask as diffusers' Krea 2 pipeline passes them

Latency is the median of --reps runs after a warm-up run (which compiles; its time is
first_run_s). Each
variant's final latents are compared with plain's: ‖x − x_plain‖ / ‖x_plain‖.

    python benchmarks/sample_speed.py --model 12b --sizes 1024 2048
    python benchmarks/sample_speed.py --model 2b --variants fast diffusers
    python benchmarks/sample_speed.py --tiny --device cpu --variants plain fast
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from profiling import one_pass_row_reductions, print_profile, profile_kernels
from train_step import load_config

from trainer.flow import euler_sample
from trainer.model import K2DiT, flops_per_sample, positions
from trainer.model.interop import config_to_diffusers, to_diffusers_state_dict
from trainer.model.layers import unfuse_projections
from trainer.sample import TURBO_MU, TURBO_STEPS, fast_sampling, trim_padding

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "fast", "diffusers", "float8", "float8-fused")  # float8 last: it quantises the weights in place
FLOAT8 = ("float8", "float8-fused")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="12b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--valid-text", type=int, default=300)
    p.add_argument("--steps", type=int, default=TURBO_STEPS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--float8", default="row", choices=("row", "tensor"),
                   help="float8 scales: one per weight row and activation token, or one per tensor")
    p.add_argument("--attention", default="flex", choices=("flex", "cudnn", "sdpa"),
                   help="fast and float8: the attention backend (an unpadded prompt runs flex and sdpa as flash)")
    p.add_argument("--no-fuse", action="store_true",
                   help="fast and float8: keep q/k/v/gate and w_gate/w_up as separate linears")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="SDPA without cuDNN's kernel (unmasked calls then run flash attention)")
    p.add_argument("--graphs", action="store_true", help="fast and float8: compiled blocks replayed as CUDA graphs")
    p.add_argument("--tune", action="store_true",
                   help="fast and float8: inductor's coordinate-descent tuning of each generated kernel")
    p.add_argument("--persistent-rows", type=int, default=0,
                   help="compile row reductions up to this width as one-pass (persistent) kernels")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one sampling run per variant and record its top device kernels")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.tiny:
        a.sizes, a.text_len, a.valid_text, a.reps = [128], 16, 10, 1
    return a


@torch.no_grad()
def random_model(cfg, device) -> K2DiT:
    """K2DiT in bf16 with every parameter drawn: weights ~ N(0, 1/fan_in), norms and
    modulation tables ~ N(0, 0.1), so each block changes its input."""
    with torch.device(device):
        model = K2DiT(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        std = 0.1 if p.ndim == 1 or p.shape[-1] <= 16 or p.shape[0] <= 16 else p.shape[-1] ** -0.5
        p.normal_(0.0, std, generator=gen)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def diffusers_twin(model: K2DiT, device):
    from diffusers import Krea2Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    with torch.device("meta"):
        twin = Krea2Transformer2DModel(**config_to_diffusers(model.cfg))
    twin.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True, assign=True)
    twin = twin.to(device).eval().requires_grad_(False)
    fusion = twin.text_fusion
    for blocks in (twin.transformer_blocks, fusion.layerwise_blocks, fusion.refiner_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block, fullgraph=False)
    return twin


def uncompiled(model: K2DiT) -> K2DiT:
    """The model with its compiled blocks swapped back for the originals, its projections unfused."""
    from trainer.parallel import shardable_blocks

    for blocks in shardable_blocks(model):
        for i, block in enumerate(blocks):
            blocks[i] = getattr(block, "_orig_mod", block)
    unfuse_projections(model)
    model.text_fusion.reuse_output, model.text_fusion._last = False, None
    model.attention = "auto"
    return model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(velocity, noise, tokens, a) -> tuple[float, float, torch.Tensor]:
    runs = []
    for _ in range(1 + a.reps):
        sync(noise.device)
        t0 = time.perf_counter()
        x = euler_sample(velocity, noise, tokens, a.steps, 0.0, TURBO_MU)
        sync(noise.device)
        runs.append(time.perf_counter() - t0)
    timed = sorted(runs[1:])
    return timed[len(timed) // 2], runs[0], x


def profile_sampling(velocity, noise, tokens, a) -> dict:
    """One sampling run's kernels (benchmarks/profiling.py), printed and returned."""
    rows, summary = profile_kernels(lambda: euler_sample(velocity, noise, tokens, a.steps, 0.0, TURBO_MU),
                                    noise.device)
    print_profile(rows, summary)
    return {**summary, "top_kernels": rows}


def bench_size(model: K2DiT, size: int, variants: list[str], a, device, save, references: dict) -> list[dict]:
    cfg = model.cfg
    side = size // 8
    h = side // cfg.patch_size
    L = h * h
    gen = torch.Generator(device=device).manual_seed(1)
    noise = torch.randn(1, L, cfg.in_channels, device=device, generator=gen)
    text = torch.randn(1, a.text_len, cfg.num_text_layers, cfg.text_dim, device=device, generator=gen)
    mask = torch.zeros(1, a.text_len, dtype=torch.bool, device=device)
    mask[:, :a.valid_text] = True
    text = (text * mask[..., None, None]).to(torch.bfloat16)
    pos = positions(a.text_len, h, h, device=device)
    short_text, short_mask = trim_padding(text, mask)
    short_pos = positions(short_text.shape[1], h, h, device=device)
    fwd_tflop = flops_per_sample(cfg, short_text.shape[1], L) / 3 / 1e12  # one forward of the trimmed sequence

    rows = []
    for variant in variants:
        torch._dynamo.reset()
        row = {"model": cfg.name, "size": size, "variant": variant}
        try:
            if variant == "diffusers":
                twin = diffusers_twin(uncompiled(model), device)

                def velocity(x, t, cond, twin=twin):
                    return twin(x.to(torch.bfloat16), text, t, pos.float(), mask).sample.float()
            elif variant == getattr(model, "_float8_prepared", None):
                # quantised, fused and compiled at the size before: the blocks recompile for this one
                def velocity(x, t, cond, args=(short_text, short_pos, short_mask)):
                    return model(x.to(torch.bfloat16), args[0], t, args[1], args[2]).float()
            else:
                uncompiled(model)
                if variant == "plain":
                    model.attention = "sdpa"
                    fast_sampling(model, attention="sdpa", compile=device.type == "cuda", fuse=False,
                                  reuse_text=False)
                    args = (text, pos, mask)
                else:
                    float8 = {"float8": a.float8, "float8-fused": "fused"}.get(variant)
                    fast_sampling(model, float8=float8,
                                  compile=device.type == "cuda", cuda_graphs=a.graphs, fuse=not a.no_fuse, tune=a.tune,
                                  attention=a.attention if device.type == "cuda" else "sdpa")
                    model._float8_prepared = variant if variant in FLOAT8 else None
                    args = (short_text, short_pos, short_mask)

                def velocity(x, t, cond, args=args):
                    return model(x.to(torch.bfloat16), args[0], t, args[1], args[2]).float()

            seconds, first_s, x = time_sampling(velocity, noise, L, a)
            row.update(seconds=seconds, first_run_s=first_s, forward_s=seconds / a.steps,
                       tflops=fwd_tflop * a.steps / seconds)
            if a.profile:
                row["profile"] = profile_sampling(velocity, noise, L, a)
            reference = references.setdefault(size, x)  # the first variant run at this size
            row["rel_err_vs_first"] = float((x - reference).norm() / reference.norm())
            if variant == "diffusers":
                del twin, velocity
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    cfg = load_config(argparse.Namespace(tiny=a.tiny, model=a.model))
    model = random_model(cfg, device)
    if a.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch._dynamo.config.cache_size_limit = 64
    if a.persistent_rows:
        one_pass_row_reductions(a.persistent_rows)
    out = Path(a.out or ROOT / f"benchmarks/results/sample_speed_{cfg.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(a), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "results": []}
    rows = record["results"]

    def save(partial: list[dict]) -> None:  # after every row: a run cut short keeps what it measured
        out.write_text(json.dumps({**record, "results": rows + partial}, indent=2) + "\n")

    # float8 quantizes the weights in place and nothing turns them back: every size of the
    # bf16 variants first, then each float8 variant's on its own copy of the same weights.
    references: dict[int, torch.Tensor] = {}
    for size in a.sizes:
        if bf16 := [v for v in a.variants if v not in FLOAT8]:
            rows += bench_size(model, size, bf16, a, device, save, references)
    for variant in [v for v in a.variants if v in FLOAT8]:
        if getattr(model, "_float8_prepared", None):
            del model
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = random_model(cfg, device)
        for size in a.sizes:
            rows += bench_size(model, size, [variant], a, device, save, references)
    print(f"{'model':<6} {'size':>5} {'variant':<11} {'s/image':>8} {'TFLOP/s':>8} {'rel err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<6} {r['size']:>5} {r['variant']:<11} {r['error'][:90]}")
        else:
            print(f"{r['model']:<6} {r['size']:>5} {r['variant']:<11} {r['seconds']:>8.3f} {r['tflops']:>8.0f} "
                  f"{r['rel_err_vs_first']:>8.4f}")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
