"""One compiled sampling block, forward only, under formulations of its elementwise work.

The Turbo sampler spends about 15% of a `12b` float8 run in inductor's fused kernels
around the GEMMs (norms, modulation, RoPE, activation quantisation, the layouts the
attention kernel wants). This times one `DiTBlock` of the chosen config at the
sampler's shape (batch 1, 1024²: 4096 image + 300 text tokens), prepared as
`trainer.sample.fast_sampling` prepares it (bf16, fused projections, the --linears:
bf16, torchao's float8 `row`, or `fused`: trainer/model/fp8_kernels.py; compiled), once
per --rope formulation, and lists each variant's kernels. Errors are against the first row.

    python benchmarks/block_kernels.py --model 12b --float8
    python benchmarks/block_kernels.py --model 12b --linears bf16 row fused --rope stack
    python benchmarks/block_kernels.py --tiny --device cpu
"""

import argparse
import json
import platform
from pathlib import Path

import torch
from profiling import print_profile, profile_kernels
from train_step import load_config

import trainer.model.layers as layers
from trainer.model.dit import DiTBlock
from trainer.model.fp8_kernels import convert_block

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="12b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=4396)
    p.add_argument("--float8", action="store_true", help="the same as --linears row")
    p.add_argument("--linears", nargs="+", default=None, choices=("bf16", "row", "fused"))
    p.add_argument("--rope", nargs="+", default=["stack", "flip", "bshk"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--autotune", nargs="+", default=["0"], choices=("0", "1"),
                   help="1: inductor's max-autotune (Triton GEMM templates beside cuBLAS), per variant")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/block_kernels.json"))
    return p.parse_args()


def rope_flip(x_BHSK, cos_SP, sin_SP):
    """The same rotation as layers.apply_rope, as x·cos + swap_pairs(x)·(−sin, sin):
    no select/stack, one pointwise expression per output channel."""
    x = x_BHSK.float()
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    cos = cos_SP.repeat_interleave(2, dim=-1)
    sin = torch.stack((-sin_SP, sin_SP), dim=-1).flatten(-2)
    return (x * cos + swapped * sin).to(x_BHSK.dtype)


def forward_bshk(self, x_BSD, cos_SP=None, sin_SP=None, mask=None):
    """Attention.forward with the q/k norms and RoPE applied in the projection's (B, S, H, K)
    layout; the attention kernel gets transposed views."""
    B, S, _ = x_BSD.shape
    H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
    q, k, v, gate = self.qkvg(x_BSD).split((H * K, G * K, G * K, H * K), dim=-1)
    q = rope_flip(self.q_norm(q.reshape(B, S, H, K)), cos_SP[:, None], sin_SP[:, None])
    k = rope_flip(self.k_norm(k.reshape(B, S, G, K)), cos_SP[:, None], sin_SP[:, None])
    o = layers.attend(q.transpose(1, 2), k.transpose(1, 2), v.reshape(B, S, G, K).transpose(1, 2), mask)
    return self.out(o.transpose(1, 2).reshape(B, S, H * K) * torch.sigmoid(gate))


ROPES = {"stack": layers.apply_rope, "flip": rope_flip, "bshk": rope_flip}
ATTENTION_FORWARD = layers.Attention.forward


def make_block(cfg, device, mode: str) -> DiTBlock:
    """One block, the same weights whatever the mode, prepared as fast_sampling does."""
    torch.manual_seed(0)
    block = DiTBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(device, torch.bfloat16).eval().requires_grad_(False)
    layers.fuse_projections(block)
    if mode == "row":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    elif mode == "fused":
        convert_block(block)
    return block


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    cfg = load_config(a)
    S = 64 if a.tiny else a.tokens
    modes = a.linears or (["row"] if a.float8 else ["bf16"])
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, S, cfg.dim, device=device, generator=gen).to(torch.bfloat16)
    tmod = (0.1 * torch.randn(1, 6, cfg.dim, device=device, generator=gen)).to(torch.bfloat16)
    angles = torch.rand(S, cfg.head_dim // 2, device=device, generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    cuda = device.type == "cuda"
    rows, reference = [], None
    for mode, name, autotune in [(m, r, t) for m in modes for t in a.autotune for r in a.rope]:
        block = make_block(cfg, device, mode)
        layers.apply_rope = ROPES[name]
        layers.Attention.forward = forward_bshk if name == "bshk" else ATTENTION_FORWARD
        torch._dynamo.reset()
        options = {"max_autotune": autotune == "1"}
        fn = torch.compile(block, fullgraph=True, options=options) if cuda else block
        with torch.no_grad():
            for _ in range(3):
                out = fn(x, tmod, cos, sin)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(a.iters):
                    fn(x, tmod, cos, sin)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / a.iters
            else:
                ms = float("nan")
            kernels, summary = profile_kernels(lambda: fn(x, tmod, cos, sin), device, top=14)
        reference = out if reference is None else reference
        err = float((out.float() - reference.float()).norm() / reference.float().norm())
        print(f"linears={mode} rope={name} autotune={autotune}: {ms:.3f} ms a block, rel err vs first {err:.2e}")
        print_profile(kernels, summary)
        rows.append({"linears": mode, "rope": name, "autotune": autotune == "1", "block_ms": ms, "rel_err_vs_first": err,
                     "profile": {**summary, "top_kernels": kernels}})
    layers.apply_rope, layers.Attention.forward = ROPES["stack"], ATTENTION_FORWARD
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": platform.node(), "model": cfg.name, "tokens": S,
                                       "linears": modes, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
