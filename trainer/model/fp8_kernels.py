"""float8 sampling with one pass over each row: fused row kernels and a row-scaled linear.

With torchao's dynamic float8 linears, every block linear quantises its input itself:
inductor fuses the producer (a modulated RMSNorm, SwiGLU, the sigmoid gate) with the
row's absolute maximum and the cast, but as a looped reduction that reads a row three
times (sum of squares, maximum, cast). At `12b` and 1024² those kernels take about
150 ms of a 1.03 s Turbo sample, several times what the bytes they move cost.

Here each producer is one Triton program per row that holds the whole row (6,144 or
16,384 values) in registers, reads it once and writes the e4m3 row and its scale:

- `norm_quant`:  [x + gate · r →] RMSNorm(x) · (1 + scale) + shift  →  e4m3 rows (the
  residual stream written too when a residual is added)
- `gate_quant`:  o · sigmoid(g)  →  e4m3 rows
- `swiglu_quant`: silu(g) · u   →  e4m3 rows

`Float8RowLinear` multiplies such rows by a weight quantised once per output row
(`torch._scaled_mm`, per-row scales on both sides, fp32 accumulation in cuBLAS's fast
mode, as torchao's inference linears do). `trainer.model.dit.DiTBlock` runs this path
when `fast_sampling(float8="fused")` has converted its linears.

Each kernel has a torch twin (`*_reference`) with the same arithmetic; CPU runs the
twins, so the whole path runs (and is tested) on CPU.
"""

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

E4M3_MAX = 448.0
SCALE_MIN = 1e-12


def _rows_to_e4m3(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) e4m3 quantisation of fp32 `h`: (h8, scale) with h ≈ h8 · scale."""
    scale = (h.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=SCALE_MIN)
    return (h / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


# ---------------------------------------------------------------- torch twins (CPU, tests)


def norm_quant_reference(x, weight, scale, shift, eps, residual=None, gate=None):
    """x (B, S, D) bf16; weight (D,) zero-centred; scale, shift, gate (B, 1, D).
    Returns (x_out, h8, h_scale): x_out = x + gate · residual (or x), h the modulated norm."""
    xf = x.float()
    if residual is not None:
        xf = xf + gate.float() * residual.float()
    x_out = xf.to(x.dtype)
    xf = x_out.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    h = (1.0 + scale.float()) * n + shift.float()
    h8, s = _rows_to_e4m3(h)
    return x_out, h8, s


def gate_quant_reference(o, g):
    """o · sigmoid(g), both (B, S, D) (o may be a strided view): e4m3 rows and scales."""
    return _rows_to_e4m3(o.float() * torch.sigmoid(g.float()))


def swiglu_quant_reference(gu):
    """gu (B, S, 2N) = [gate | up]: silu(gate) · up as e4m3 rows and scales."""
    g, u = gu.float().chunk(2, dim=-1)
    return _rows_to_e4m3(torch.nn.functional.silu(g) * u)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _store_rows_e4m3(h, Y8, Ys, row, offs, mask, D):
        amax = tl.max(tl.where(mask, tl.abs(h), 0.0), 0)
        scale = tl.maximum(amax / 448.0, 1e-12)
        y = tl.minimum(tl.maximum(h / scale, -448.0), 448.0)
        tl.store(Y8 + row * D + offs, y.to(tl.float8e4nv), mask=mask)
        tl.store(Ys + row, scale)

    @triton.jit
    def _norm_quant_kernel(X, R, Gt, W, Sc, Sh, Xo, Y8, Ys, S, D, eps,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(X + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * D + offs, mask=mask, other=0.0).to(tl.float32)
            gt = tl.load(Gt + b * D + offs, mask=mask, other=0.0).to(tl.float32)
            x = (x + gt * r).to(tl.bfloat16)
            tl.store(Xo + row * D + offs, x, mask=mask)
            x = x.to(tl.float32)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(Sc + b * D + offs, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(Sh + b * D + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        h = (1.0 + sc) * (x * rstd * (1.0 + w)) + sh
        _store_rows_e4m3(h, Y8, Ys, row, offs, mask, D)

    @triton.jit
    def _gate_quant_kernel(O, G, Y8, Ys, S, D, sob, sos, soh, sgr, HEAD: tl.constexpr, ROW: tl.constexpr,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        s = row % S
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        if ROW:  # heads adjacent in memory: the row is contiguous
            o = tl.load(O + b * sob + s * sos + offs, mask=mask, other=0.0)
        else:
            o = tl.load(O + b * sob + s * sos + (offs // HEAD) * soh + offs % HEAD, mask=mask, other=0.0)
        g = tl.load(G + row * sgr + offs, mask=mask, other=0.0).to(tl.float32)  # a column slice of the projection
        h = o.to(tl.float32) * tl.sigmoid(g)
        _store_rows_e4m3(h, Y8, Ys, row, offs, mask, D)

    @triton.jit
    def _swiglu_quant_kernel(GU, Y8, Ys, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(GU + row * 2 * N + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * N + N + offs, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        _store_rows_e4m3(h, Y8, Ys, row, offs, mask, N)


# num_warps per kernel, the fastest of 4/8/16/32 at `12b`'s widths on an H200
# (benchmarks/fp8_row_kernels.py, which overrides them to compare).
WARPS_DEFAULT = {"norm": 4, "norm_res": 16, "gate": 4, "swiglu": 32}
WARPS: dict[str, int] = {}


def _warps(op: str, block: int) -> int:
    return WARPS.get(op) or min(WARPS_DEFAULT[op], max(1, block // 32))


# The kernels as opaque torch operators (`torch.library.custom_op` with shape functions):
# a compiled block calls them between its inductor kernels. (As `triton_op`, which hands
# the kernel to inductor, the norm kernel fails to build in inductor on torch 2.11.)
_ops = {}


def _fake_rows(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, S = x.shape[0], x.shape[1]
    return (x.new_empty(B, S, width, dtype=torch.float8_e4m3fn), x.new_empty(B, S, 1, dtype=torch.float32))


if triton is not None:
    from torch.library import custom_op

    @custom_op("k2train::norm_quant", mutates_args=())
    def norm_quant_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      eps: float, residual: torch.Tensor | None,
                      gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, D = x.shape
        h8 = torch.empty(B, S, D, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(B, S, 1, dtype=torch.float32, device=x.device)
        has_res = residual is not None
        x_out = torch.empty_like(x) if has_res else x.new_empty(0)
        block = triton.next_power_of_2(D)
        _norm_quant_kernel[(B * S,)](
            x, residual if has_res else x, gate if has_res else scale, weight, scale, shift, x_out, h8, hs,
            S, D, eps, HAS_RES=has_res, BLOCK=block,
            num_warps=_warps("norm_res" if has_res else "norm", block))
        return x_out, h8, hs

    @custom_op("k2train::gate_quant", mutates_args=())
    def gate_quant_op(o_BHSK: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, S, K = o_BHSK.shape
        D = H * K
        h8 = torch.empty(B, S, D, dtype=torch.float8_e4m3fn, device=g.device)
        hs = torch.empty(B, S, 1, dtype=torch.float32, device=g.device)
        block = triton.next_power_of_2(D)
        _gate_quant_kernel[(B * S,)](
            o_BHSK, g, h8, hs, S, D, o_BHSK.stride(0), o_BHSK.stride(2), o_BHSK.stride(1), g.stride(1),
            HEAD=K, ROW=o_BHSK.stride(1) == K, BLOCK=block, num_warps=_warps("gate", block))
        return h8, hs

    @custom_op("k2train::swiglu_quant", mutates_args=())
    def swiglu_quant_op(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, N2 = gu.shape
        N = N2 // 2
        h8 = torch.empty(B, S, N, dtype=torch.float8_e4m3fn, device=gu.device)
        hs = torch.empty(B, S, 1, dtype=torch.float32, device=gu.device)
        block = triton.next_power_of_2(N)
        _swiglu_quant_kernel[(B * S,)](gu, h8, hs, N, BLOCK=block, num_warps=_warps("swiglu", block))
        return h8, hs

    @norm_quant_op.register_fake
    def _(x, weight, scale, shift, eps, residual, gate):
        x_out = torch.empty_like(x) if residual is not None else x.new_empty(0)
        return (x_out, *_fake_rows(x, x.shape[-1]))

    @gate_quant_op.register_fake
    def _(o_BHSK, g):
        return _fake_rows(g, g.shape[-1])

    @swiglu_quant_op.register_fake
    def _(gu):
        return _fake_rows(gu, gu.shape[-1] // 2)

    _ops.update(norm=norm_quant_op, gate=gate_quant_op, swiglu=swiglu_quant_op)


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.device.type == "cuda"


def norm_quant(x, weight, scale, shift, eps, residual=None, gate=None):
    """See `norm_quant_reference`; x, residual contiguous (B, S, D), scale/shift/gate (B, 1, D).
    Returns (x_out, h8, h_scale); x_out is `x` itself when no residual is added."""
    if not _use_triton(x):
        return norm_quant_reference(x, weight, scale, shift, eps, residual, gate)
    B, D = x.shape[0], x.shape[-1]
    mods = [t.reshape(B, D).contiguous() for t in (scale, shift)]
    if residual is None:
        _, h8, hs = _ops["norm"](x.contiguous(), weight, *mods, eps, None, None)
        return x, h8, hs
    return _ops["norm"](x.contiguous(), weight, *mods, eps, residual.contiguous(), gate.reshape(B, D).contiguous())


def gate_quant(o_BHSK, g_BSD):
    """e4m3 rows of o · sigmoid(g) for the attention output o (B, H, S, K, any strides with
    the last one 1) and the gate g (B, S, H·K; a column slice of a wider tensor is read in place)."""
    if not _use_triton(g_BSD):
        B, H, S, K = o_BHSK.shape
        return gate_quant_reference(o_BHSK.transpose(1, 2).reshape(B, S, H * K), g_BSD)
    if g_BSD.stride(-1) != 1 or g_BSD.stride(0) != g_BSD.shape[1] * g_BSD.stride(1):
        g_BSD = g_BSD.contiguous()  # the kernel reads rows at one stride: the projection's slice is read in place
    return _ops["gate"](o_BHSK, g_BSD)


def swiglu_quant(gu_BSN2):
    """e4m3 rows of silu(gate) · up for the fused [gate | up] projection (B, S, 2N)."""
    if not _use_triton(gu_BSN2):
        return swiglu_quant_reference(gu_BSN2)
    return _ops["swiglu"](gu_BSN2.contiguous())


class Float8RowLinear(nn.Module):
    """A bias-free linear for inference with its weight in e4m3, one scale per output row.

    `forward(x)` quantises x per row itself (bf16 in, bf16 out); `mm(x8, x_scale)` takes
    rows quantised by one of the kernels above. CUDA multiplies with `torch._scaled_mm`;
    elsewhere the same products are formed in fp32 from the dequantised operands."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Float8RowLinear takes bias-free linears")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, ws = _rows_to_e4m3(linear.weight.detach().float())
        self.register_buffer("weight8", w8)
        self.register_buffer("weight_scale", ws.reshape(1, -1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, xs = _rows_to_e4m3(x.float())
        return self.mm(x8, xs)

    def mm(self, x8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        lead = x8.shape[:-1]
        a, sa = x8.reshape(-1, x8.shape[-1]), x_scale.reshape(-1, 1)
        if a.device.type == "cuda":
            out = torch._scaled_mm(a, self.weight8.t(), scale_a=sa, scale_b=self.weight_scale,
                                   out_dtype=torch.bfloat16, use_fast_accum=True)
        else:
            out = ((a.float() * sa) @ (self.weight8.float() * self.weight_scale.t()).t()).to(torch.bfloat16)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row"


def convert_block(block: nn.Module) -> bool:
    """A DiTBlock's fused linears (attention qkvg and out, SwiGLU w_gate_up and w_down) as
    `Float8RowLinear`; the block then runs `dit.float8_block_forward`. False (nothing done)
    when the projections are not fused plain linears (`fuse_projections` first)."""
    attn, mlp = block.attn, block.mlp
    linears = (attn.qkvg, attn.out, mlp.w_gate_up, mlp.w_down)
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return False
    attn.qkvg, attn.out = Float8RowLinear(attn.qkvg), Float8RowLinear(attn.out)
    mlp.w_gate_up, mlp.w_down = Float8RowLinear(mlp.w_gate_up), Float8RowLinear(mlp.w_down)
    block.float8_rows = True
    return True
