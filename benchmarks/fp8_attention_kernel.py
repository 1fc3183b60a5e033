"""A float8 attention kernel for sampling: one Triton kernel, forward only, no mask.

An experiment for the Turbo sampler (benchmarks/attention_fp8.py times it; the sampler
does not use it: at `12b`'s shape it ran at half the speed of cuDNN's bf16 kernel on an
H200, docs/PERF_NOTES.md). Both products of attention run in e4m3:

- Q·Kᵀ: q and k are e4m3 with one scale each. After the per-head RMSNorm (weight
  `1 + w`) and RoPE (a rotation of channel pairs) no element of a head's vector exceeds
  `sqrt(head_dim) · max|1 + w|`, so the scales come from the norm weights.
- P·V: the softmax numerators, scaled by 2⁸ so that small probabilities stay above
  e4m3's subnormal range, are cast to e4m3 in the kernel; v is e4m3 with a per-tensor
  scale from its absolute maximum, stored transposed (B, G, K, S) because Hopper's
  float8 MMA wants its second operand contiguous along the reduced dimension.
- The softmax (running maximum, sum, rescaling) stays in fp32, as in flash attention;
  the output is bf16 in the (B, S, H, K) layout.

Grouped-query attention is native: query head h reads key/value head h // (H / G).
`attention_fp8_reference` is the same arithmetic in torch.
"""

import math

import torch

E4M3_MAX = 448.0
P_SCALE_LOG2 = 8.0  # probabilities enter P·V as p · 2⁸


def rope_norm_bound(norm_weight: torch.Tensor) -> torch.Tensor:
    """Largest |element| a head vector can have after `RMSNorm` (weight `1 + w`) and RoPE:
    its norm is at most sqrt(K) · max|1 + w|, and a rotation keeps pair norms."""
    return math.sqrt(norm_weight.numel()) * (norm_weight.float() + 1.0).abs().max()


def quantize_e4m3(x: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` as e4m3 with the per-tensor scale that maps `bound` to e4m3's largest value;
    returns (x8, scale) with x ≈ x8 · scale."""
    scale = (bound.float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_qkv(q_BSHK, k_BSGK, v_BSGK, q_norm_w, k_norm_w):
    """The kernel's inputs: e4m3 q (B, S, H, K), k (B, S, G, K) and vᵀ (B, G, K, S), and the
    three scales as one fp32 tensor (kept on the device: no host read)."""
    q8, sq = quantize_e4m3(q_BSHK, rope_norm_bound(q_norm_w))
    k8, sk = quantize_e4m3(k_BSGK, rope_norm_bound(k_norm_w))
    vt8, sv = quantize_e4m3(v_BSGK.permute(0, 2, 3, 1), v_BSGK.detach().abs().amax())
    return q8, k8, vt8.contiguous(), torch.stack((sq, sk, sv))


def attention_fp8_reference(q8, k8, vt8, scales) -> torch.Tensor:
    """What the kernel computes, in torch (fp32, one softmax over all keys, P cast to e4m3
    as the kernel does). For tests and for machines without Triton; returns (B, S, H, K)."""
    B, S, H, K = q8.shape
    G = k8.shape[2]
    q = q8.float().transpose(1, 2) * scales[0]
    k = k8.float().transpose(1, 2).repeat_interleave(H // G, dim=1) * scales[1]
    v = vt8.float().transpose(-1, -2).repeat_interleave(H // G, dim=1)
    s = (q @ k.transpose(-1, -2)) * (K**-0.5 * math.log2(math.e))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp2(s - m + P_SCALE_LOG2)
    pv = p.to(torch.float8_e4m3fn).float() @ v
    out = pv * scales[2] / p.sum(dim=-1, keepdim=True)
    return out.transpose(1, 2).to(torch.bfloat16)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

if triton is not None:
    @triton.jit
    def _tile(acc, m_i, l_i, q, K_ptrs, V_ptrs, start_n, S, qk_scale,
              BLOCK_N: tl.constexpr, HEAD: tl.constexpr, MASKED: tl.constexpr, sks, svs):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(K_ptrs + offs_n[:, None] * sks, mask=offs_n[:, None] < S, other=0.0)
            vt = tl.load(V_ptrs + offs_n[None, :] * svs, mask=offs_n[None, :] < S, other=0.0)
        else:
            k = tl.load(K_ptrs + offs_n[:, None] * sks)
            vt = tl.load(V_ptrs + offs_n[None, :] * svs)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            s = tl.where(offs_n[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None] + 8.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
        return acc, m_new, l_i

    @triton.jit
    def fp8_attention_fwd(Q, K, Vt, O, scales, S,
                          sqb, sqs, sqh, skb, sks, skg, svb, svg, svk, sob, sos, soh,
                          H: tl.constexpr, G: tl.constexpr, HEAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        g = h // (H // G)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                    mask=offs_m[:, None] < S, other=0.0)
        # log2(e) / sqrt(K) with the q and k scales folded in: exp2 of these logits is the softmax.
        qk_scale = tl.load(scales) * tl.load(scales + 1) * 1.4426950408889634 / tl.sqrt(HEAD * 1.0)
        K_ptrs = K + b * skb + g * skg + offs_d[None, :]
        V_ptrs = Vt + b * svb + g * svg + offs_d[:, None] * svk
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
        full = (S // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, K_ptrs, V_ptrs, start_n, S, qk_scale,
                                  BLOCK_N, HEAD, False, sks, 1)
        if full < S:
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, K_ptrs, V_ptrs, full, S, qk_scale,
                                  BLOCK_N, HEAD, True, sks, 1)
        out = acc * (tl.load(scales + 2) / l_i[:, None])
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(tl.bfloat16),
                 mask=offs_m[:, None] < S)


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("fp8 attention needs Triton (it ships with torch's CUDA builds)")


CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


def launch(q8, k8, vt8, scales, out=None, **config) -> torch.Tensor:
    """Runs the kernel: q8 (B, S, H, K), k8 (B, S, G, K) (any strides with the last one 1),
    vt8 (B, G, K, S) contiguous, scales (3,) fp32. Returns (B, S, H, K) bf16."""
    _need_triton()
    B, S, H, K = q8.shape
    G = k8.shape[2]
    if q8.stride(-1) != 1 or k8.stride(-1) != 1 or vt8.stride(-1) != 1:
        raise ValueError("fp8 attention needs the head dimension of q and k, and the keys of vᵀ, contiguous")
    if H % G:
        raise ValueError(f"{H} query heads do not divide into {G} key/value heads")
    cfg = {**CONFIG, **config}
    if out is None:
        out = torch.empty(B, S, H, K, dtype=torch.bfloat16, device=q8.device)
    grid = (triton_cdiv(S, cfg["BLOCK_M"]), B * H)
    fp8_attention_fwd[grid](q8, k8, vt8, out, scales, S,
                           q8.stride(0), q8.stride(1), q8.stride(2),
                           k8.stride(0), k8.stride(1), k8.stride(2),
                           vt8.stride(0), vt8.stride(1), vt8.stride(2),
                           out.stride(0), out.stride(1), out.stride(2),
                           H=H, G=G, HEAD=K, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
