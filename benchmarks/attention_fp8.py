"""Attention of one sampling call: bf16 SDPA (cuDNN, flash) against the float8 kernel.

The kernel (benchmarks/fp8_attention_kernel.py) is an experiment: on an H200 it ran at
half cuDNN's bf16 speed (docs/PERF_NOTES.md), so the sampler does not use it.

The shape of one main-block call of Turbo sampling at batch 1 with the prompt trimmed
(`--model 12b --size 1024`: 4096 image + 300 text tokens, 48 query heads over 12
key/value heads of 128). q and k are drawn as the model makes them (RMSNorm with a
weight 1 + N(0, 0.1)), v ~ N(0, 1). Every row's output is compared with fp32 attention
of the same bf16 inputs: ‖o − o_fp32‖ / ‖o_fp32‖. The float8 rows are timed with and
without the quantisation of q, k and v (`quantize_qkv`), the kernel at several tile
configurations.

    python benchmarks/attention_fp8.py --model 12b --sizes 1024 2048
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from profiling import timed
from train_step import load_config

from fp8_attention_kernel import attention_fp8_reference, launch, quantize_qkv

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 3),
    (64, 128, 4, 3), (128, 256, 8, 2), (256, 128, 8, 2),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="12b")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--text", type=int, default=300)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cfg = load_config(argparse.Namespace(tiny=False, model=a.model))
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dev = torch.device("cuda")
    rows = []
    for size in a.sizes:
        S = (size // 8 // cfg.patch_size) ** 2 + a.text
        gen = torch.Generator(device=dev).manual_seed(0)
        qw, kw = (torch.randn(K, device=dev, generator=gen) * 0.1 for _ in range(2))
        q = F.rms_norm(torch.randn(1, S, H, K, device=dev, generator=gen), (K,), qw + 1).bfloat16()
        k = F.rms_norm(torch.randn(1, S, G, K, device=dev, generator=gen), (K,), kw + 1).bfloat16()
        v = torch.randn(1, S, G, K, device=dev, generator=gen).bfloat16()
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ref = F.scaled_dot_product_attention(qh.float(), kh.float().repeat_interleave(H // G, 1),
                                             vh.float().repeat_interleave(H // G, 1)).transpose(1, 2)
        flops = 4 * S * S * K * H

        def err(o):
            return float((o.float() - ref).norm() / ref.norm())

        def row(name, ms, out, **extra):
            r = {"model": cfg.name, "size": size, "tokens": S, "kernel": name, "ms": ms,
                 "tflops": flops / ms / 1e9, "rel_err_vs_fp32": err(out), **extra}
            rows.append(r)
            print(json.dumps(r), flush=True)

        for name, backend in (("sdpa cudnn bf16", SDPBackend.CUDNN_ATTENTION), ("sdpa flash bf16", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    fn = lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)  # noqa: E731
                    row(name, timed(fn, a.reps), fn().transpose(1, 2))
            except Exception as e:
                rows.append({"size": size, "kernel": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(rows[-1], flush=True)
        q8, k8, vt8, scales = quantize_qkv(q, k, v, qw, kw)
        # the same arithmetic in torch (its (B, H, S, S) scores do not fit at 2048²)
        emulated = attention_fp8_reference(q8, k8, vt8, scales) if S <= 8192 else None
        for bm, bn, w, st in CONFIGS:
            cfg_k = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            try:
                out = launch(q8, k8, vt8, scales, **cfg_k)
                fn = lambda: launch(q8, k8, vt8, scales, out=out, **cfg_k)  # noqa: E731
                ms = timed(fn, a.reps)
                extra = {} if emulated is None else {
                    "rel_err_vs_emulated": float((out.float() - emulated.float()).norm() / emulated.float().norm())}
                row(f"fp8 kernel {bm}x{bn} w{w} s{st}", ms, out, config=cfg_k, **extra)
            except Exception as e:
                rows.append({"size": size, "kernel": f"fp8 {cfg_k}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(rows[-1], flush=True)
        best = min((r for r in rows if r.get("size") == size and "config" in r), key=lambda r: r["ms"], default=None)
        if best:
            quant = torch.compile(quantize_qkv)
            fn = lambda: launch(*quant(q, k, v, qw, kw), **best["config"])  # noqa: E731
            row(f"fp8 quantise (compiled) + kernel {best['config']['BLOCK_M']}x{best['config']['BLOCK_N']}",
                timed(fn, a.reps), fn(), config=best["config"])
        torch.cuda.empty_cache()

    print(f"{'size':>5} {'tokens':>6} {'kernel':<44} {'ms':>7} {'TFLOP/s':>8} {'err':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>5} {'':>6} {r['kernel'][:44]:<44} {r['error'][:80]}")
        else:
            print(f"{r['size']:>5} {r['tokens']:>6} {r['kernel']:<44} {r['ms']:>7.3f} {r['tflops']:>8.0f} "
                  f"{r['rel_err_vs_fp32']:>7.4f}")
    out = Path(a.out or ROOT / f"benchmarks/results/attention_fp8_{cfg.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                               "device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
