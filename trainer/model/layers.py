"""Building blocks of the K2 DiT: RMSNorm, SwiGLU, gated GQA attention, 3D RoPE, timestep sinusoid.

Everything here is compile-friendly: no Python control flow depends on tensor
values, only on whether an optional tensor (mask, rotary table) was passed.
Shape letters: B batch, S sequence, H query heads, G kv heads, K head_dim,
D model width.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.attention import attend


class RMSNorm(nn.Module):
    """RMSNorm whose stored weight `w` is zero-centred: the multiplier is `1 + w`.

    This is the Krea 2 checkpoint convention (so weight decay pulls towards
    scale 1, and a zero-initialised weight is the identity scale). The
    normalisation runs in fp32 whatever the activation dtype: in bf16 the mean
    of squares over 6144 channels loses enough precision to shift outputs.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() + 1.0
        return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """`w_down(silu(w_gate x) * w_up x)`, no biases.

    `concat_weights`: w_gate and w_up run as one GEMM of their concatenated weights at
    every call (training: the parameters stay separate; `fuse` is the inference form)."""

    concat_weights = False

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.w_gate_up = None  # set by `fuse`

    def fuse(self) -> bool:
        """Inference: w_gate and w_up as one linear (one wider GEMM). The same function;
        the separate weights are dropped, so the state dict changes. False (nothing done)
        when either is not a plain Linear (a LoRA layer, a float8 one)."""
        if self.w_gate_up is not None or not _plain_linears(self.w_gate, self.w_up):
            return False
        self.w_gate_up = _concat_linears(self.w_gate, self.w_up)
        del self.w_gate, self.w_up
        return True

    def unfuse(self) -> bool:
        """The inverse of `fuse`: w_gate and w_up again (the release state dict)."""
        if self.w_gate_up is None or not _plain_linears(self.w_gate_up):
            return False
        self.w_gate, self.w_up = _split_linear(self.w_gate_up, 2 * (self.w_down.in_features,))
        self.w_gate_up = None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate_up is not None:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        if self.concat_weights and _plain_linears(self.w_gate, self.w_up):
            gate, up = F.linear(x, torch.cat((self.w_gate.weight, self.w_up.weight))).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _plain_linears(*modules: nn.Module) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


@torch.no_grad()
def _concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the outputs of `linears`, concatenated."""
    w = torch.cat([m.weight for m in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=linears[0].weight.requires_grad)
    return fused


@torch.no_grad()
def _split_linear(fused: nn.Linear, sizes: tuple[int, ...]) -> list[nn.Linear]:
    parts = []
    for w in fused.weight.split(sizes):
        part = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        part.weight = nn.Parameter(w.clone(), requires_grad=fused.weight.requires_grad)
        parts.append(part)
    return parts


# ---------------------------------------------------------------- rotary embedding


def rope_tables(pos_S3: torch.Tensor, axes: list[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (S, head_dim // 2) for 3D axial RoPE.

    Axis `i` of the position rotates `axes[i] // 2` channel pairs with
    frequencies `theta ** (-2j / axes[i])`. Angles are formed in float64:
    positions reach ~10^2 and fp32 angle errors would grow with them, and
    that is what the reference implementation does, so tables match exactly.
    """
    if pos_S3.ndim != 2 or pos_S3.shape[1] != len(axes):
        raise ValueError(f"positions must have shape (S, {len(axes)}), got {tuple(pos_S3.shape)}")
    pos = pos_S3.to(torch.float64)
    angles = []
    for i, axis_dim in enumerate(axes):
        inv_freq = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=pos.device) / axis_dim)
        angles.append(pos[:, i, None] * inv_freq)
    angles_SP = torch.cat(angles, dim=-1)  # P = head_dim // 2 pairs
    return angles_SP.cos().float(), angles_SP.sin().float()


def apply_rope(x_BHSK: torch.Tensor, cos_SP: torch.Tensor, sin_SP: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved channel pairs (2j, 2j+1) of every head by the angle of pair j.

    Computed in fp32 (bf16 rotations of large-norm q/k drift), returned in the input dtype.
    """
    x = x_BHSK.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x[..., 0], x[..., 1]
    out = torch.stack((x_even * cos_SP - x_odd * sin_SP, x_odd * cos_SP + x_even * sin_SP), dim=-1)
    return out.flatten(-2).to(x_BHSK.dtype)


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Grouped-query self-attention with per-head QK RMSNorm, RoPE and a sigmoid output gate.

    `out(attn(x) * sigmoid(gate(x)))`: the gate is a full d×d projection of the
    same (modulated) input, applied before the output projection.

    `concat_weights`: q, k, v and gate run as one GEMM of their concatenated weights at
    every call (training: the parameters stay separate; `fuse` is the inference form).
    """

    concat_weights = False

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, eps: float = 1e-5):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"dim={dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads} do not divide")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_dim, bias=False)
        self.v = nn.Linear(dim, kv_dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.qkvg = None  # set by `fuse`

    def fuse(self) -> bool:
        """Inference: q, k, v and gate as one linear of the same input (one wider GEMM).
        The same function; the separate weights are dropped, so the state dict changes.
        False (nothing done) when one of them is not a plain Linear (LoRA, float8)."""
        if self.qkvg is not None or not _plain_linears(self.q, self.k, self.v, self.gate):
            return False
        self.qkvg = _concat_linears(self.q, self.k, self.v, self.gate)
        del self.q, self.k, self.v, self.gate
        return True

    def unfuse(self) -> bool:
        """The inverse of `fuse`: q, k, v and gate again (the release state dict)."""
        if self.qkvg is None or not _plain_linears(self.qkvg):
            return False
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        self.q, self.k, self.v, self.gate = _split_linear(self.qkvg, (H * K, G * K, G * K, H * K))
        self.qkvg = None
        return True

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SP: torch.Tensor | None = None,
        sin_SP: torch.Tensor | None = None,
        mask=None,
    ) -> torch.Tensor:
        """`mask`: None, a bool (B, 1, 1, S) key mask, or another form of it from
        trainer/model/attention.py (FlexAttention, cuDNN)."""
        B, S, _ = x_BSD.shape
        if self.qkvg is not None:
            q_BSD, k_BSD, v_BSD, gate_BSD = self.split_qkvg(self.qkvg(x_BSD))
        elif self.concat_weights and _plain_linears(self.q, self.k, self.v, self.gate):
            w = torch.cat((self.q.weight, self.k.weight, self.v.weight, self.gate.weight))
            q_BSD, k_BSD, v_BSD, gate_BSD = self.split_qkvg(F.linear(x_BSD, w))
        else:
            q_BSD, k_BSD, v_BSD, gate_BSD = self.q(x_BSD), self.k(x_BSD), self.v(x_BSD), None
        o_BHSK = self.attend_projected(q_BSD, k_BSD, v_BSD, cos_SP, sin_SP, mask)
        o_BSD = o_BHSK.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        return self.out(o_BSD * torch.sigmoid(self.gate(x_BSD) if gate_BSD is None else gate_BSD))

    def split_qkvg(self, qkvg_BSD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fused projection's output as q, k, v and gate."""
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        return qkvg_BSD.split((H * K, G * K, G * K, H * K), dim=-1)

    def attend_projected(self, q_BSD, k_BSD, v_BSD, cos_SP=None, sin_SP=None, mask=None) -> torch.Tensor:
        """QK norms, RoPE and attention of projected q, k, v: the output (B, H, S, K)."""
        B, S, _ = q_BSD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        q_BHSK = self.q_norm(q_BSD.reshape(B, S, H, K)).transpose(1, 2)
        k_BGSK = self.k_norm(k_BSD.reshape(B, S, G, K)).transpose(1, 2)
        v_BGSK = v_BSD.reshape(B, S, G, K).transpose(1, 2)
        if cos_SP is not None:
            q_BHSK = apply_rope(q_BHSK, cos_SP, sin_SP)
            k_BGSK = apply_rope(k_BGSK, cos_SP, sin_SP)
        return attend(q_BHSK, k_BGSK, v_BGSK, mask)


# ---------------------------------------------------------------- timestep


def timestep_embedding(t_B: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoid of `scale·t` with `dim // 2` geometric frequencies, cosines first: (B, dim) fp32.

    Flow time t ∈ [0, 1] is scaled by 1000 so the frequencies see the same
    range as in DDPM-style integer-timestep models.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BF = (t_B.float() * scale)[:, None] * freqs
    return torch.cat((args_BF.cos(), args_BF.sin()), dim=-1)


def fuse_projections(model: nn.Module) -> int:
    """Every attention's q, k, v and gate, and every SwiGLU's w_gate and w_up, as one
    linear each (inference only: the state dict changes). Modules whose linears are not
    plain (LoRA, float8) stay as they are. Returns how many were fused."""
    return sum(m.fuse() for m in list(model.modules()) if isinstance(m, (Attention, SwiGLU)))


def unfuse_projections(model: nn.Module) -> int:
    """The inverse of `fuse_projections`: the separate linears (and the release state dict) again."""
    return sum(m.unfuse() for m in list(model.modules()) if isinstance(m, (Attention, SwiGLU)))
