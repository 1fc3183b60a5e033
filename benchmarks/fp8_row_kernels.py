"""The fused float8 row kernels of trainer/model/fp8_kernels.py against inductor.

Each kernel (one Triton program per row), at each --warps, runs beside its torch twin
compiled by inductor, at the shapes of one `12b` sampling block (batch 1, 4096 image + 300 text
tokens): time (CUDA events, median), the bytes the op must move at least and the
bandwidth that makes, and the share of e4m3 outputs equal to the twin's.

    python benchmarks/fp8_row_kernels.py --model 12b
"""

import argparse
import json
import time
from pathlib import Path

import torch
from profiling import timed
from train_step import load_config

from trainer.model import fp8_kernels as fk

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="12b")
    p.add_argument("--tokens", type=int, default=4396)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="num_warps to try for each kernel (the row lists each)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cfg = load_config(argparse.Namespace(tiny=False, model=a.model))
    D, N, H, K, S = cfg.dim, cfg.mlp_hidden, cfg.num_heads, cfg.head_dim, a.tokens
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * std).bfloat16()

    x, r, g = rnd(1, S, D), rnd(1, S, D), rnd(1, S, D)
    w = rnd(D, std=0.1).float()
    sc, sh, gt = rnd(1, 1, D, std=0.3), rnd(1, 1, D, std=0.3), rnd(1, 1, D, std=0.3)
    o = rnd(1, S, H, K).transpose(1, 2)  # the layout SDPA returns for transposed-view inputs
    o_bhsk = rnd(1, H, S, K)  # heads apart in memory
    gu = rnd(1, S, 2 * N)
    e, f8 = 2, 1  # bytes per bf16 / e4m3 element
    cases = {
        "norm": (lambda: fk.norm_quant(x, w, sc, sh, 1e-5),
                       lambda: fk.norm_quant_reference(x, w, sc, sh, 1e-5), S * D * (e + f8)),
        "norm_res": (lambda: fk.norm_quant(x, w, sc, sh, 1e-5, r, gt),
                                  lambda: fk.norm_quant_reference(x, w, sc, sh, 1e-5, r, gt), S * D * (3 * e + f8)),
        "gate": (lambda: fk.gate_quant(o, g),
                       lambda: fk.gate_quant_reference(o.transpose(1, 2).reshape(1, S, D), g), S * D * (2 * e + f8)),
        "gate_bhsk": (lambda: fk.gate_quant(o_bhsk, g),
                      lambda: fk.gate_quant_reference(o_bhsk.transpose(1, 2).reshape(1, S, D), g), S * D * (2 * e + f8)),
        "swiglu": (lambda: fk.swiglu_quant(gu), lambda: fk.swiglu_quant_reference(gu), S * N * (2 * e + f8)),
    }
    rows = []
    for name, (kernel, twin, nbytes) in cases.items():
        for warps in [0] + a.warps:  # 0: inductor's kernel for the twin
            row = {"op": name, "num_warps": warps or "inductor", "min_bytes": nbytes}
            try:
                if warps:
                    fk.WARPS[name.split("_bhsk")[0]] = warps
                    fn = kernel
                else:
                    fn = torch.compile(twin)
                ms = timed(fn, a.reps)
                got, want = fn(), twin()
                row.update(ms=ms, tb_s=nbytes / ms / 1e9,
                           e4m3_equal=float((got[-2].float() == want[-2].float()).float().mean()),
                           scale_rel_err=float(((got[-1] - want[-1]).abs() / want[-1]).max()))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            fk.WARPS.clear()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'op':<9} {'num_warps':>9} {'ms':>7} {'TB/s':>5} {'equal':>6}")
    for r_ in rows:
        if "error" in r_:
            print(f"{r_['op']:<9} {r_['num_warps']:>9} {r_['error'][:100]}")
        else:
            print(f"{r_['op']:<9} {r_['num_warps']:>9} {r_['ms']:>7.4f} {r_['tb_s']:>5.2f} {r_['e4m3_equal']:>6.3f}")
    out = Path(a.out or ROOT / f"benchmarks/results/fp8_row_kernels_{cfg.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                               "device": torch.cuda.get_device_name(), "tokens": S, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
