"""K2DiT: the single-stream diffusion transformer of Krea 2, in our own module names.

Data path for one call (B batch, T text tokens, L image tokens, S = T + L):

    text_BTKD ─ text_fusion (layerwise over K tapped layers, collapse K→1, refiner over T) ─ text_in ─┐
    x_BLC ───── img_in ────────────────────────────────────────────────────────────────────────────── cat → blocks → final → v_BLC
    t_B ─────── sinusoid → time_mlp = temb ── gelu → time_proj (6·D, shared by all blocks)

Every block adds its own (6, D) table to the shared time projection; the final
layer adds a (2, D) table to the raw `temb`. interop.py maps these names to the
diffusers and official-release layouts.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.attention import key_padding, resolve_backend, split_key_padding, valid_first, varlen_segments
from trainer.model.config import ModelConfig
from trainer.model.fp8_kernels import gate_quant, norm_quant, swiglu_quant
from trainer.model.layers import Attention, RMSNorm, SwiGLU, rope_tables, timestep_embedding

# ---------------------------------------------------------------- latent packing


def patchify(latents_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/p)·(W/p), C·p·p), tokens row-major, channels ordered (c, dy, dx).

    This is the packing of the diffusers Krea 2 pipeline, so token channels of a
    released checkpoint mean the same thing here.
    """
    B, C, H, W = latents_BCHW.shape
    if H % p or W % p:
        raise ValueError(f"latent size {H}x{W} is not divisible by patch size {p}")
    x = latents_BCHW.view(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x_BLC: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify`; `h`, `w` are the latent height and width (not token counts)."""
    B, L, Cpp = x_BLC.shape
    if h % p or w % p or L != (h // p) * (w // p) or Cpp % (p * p):
        raise ValueError(f"cannot unpatchify {tuple(x_BLC.shape)} into {h}x{w} latents with patch {p}")
    x = x_BLC.view(B, h // p, w // p, Cpp // (p * p), p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, Cpp // (p * p), h, w)


def positions(text_len: int, h_tokens: int, w_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer RoPE positions (S, 3) for `[text | image]`: text rows all zero, image rows (0, row, col)."""
    rows = torch.arange(h_tokens, device=device).repeat_interleave(w_tokens)
    cols = torch.arange(w_tokens, device=device).repeat(h_tokens)
    image_L3 = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1)
    text_T3 = torch.zeros(text_len, 3, dtype=image_L3.dtype, device=device)
    return torch.cat((text_T3, image_L3), dim=0)


# ---------------------------------------------------------------- modules


class TimeMLP(nn.Module):
    """Sinusoid → Linear → GELU(tanh) → Linear: the raw time embedding `temb` (B, D)."""

    def __init__(self, timestep_dim: int, dim: int):
        super().__init__()
        self.timestep_dim = timestep_dim
        self.fc1 = nn.Linear(timestep_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = timestep_embedding(t_B, self.timestep_dim).to(dtype)
        return self.fc2(F.gelu(self.fc1(emb), approximate="tanh"))


class TextBlock(nn.Module):
    """Plain pre-norm transformer block (no RoPE, no time modulation) of the text-fusion stage."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, eps)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x_BSD: torch.Tensor, mask_B11S: torch.Tensor | None = None) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), mask=mask_B11S)
        return x_BSD + self.mlp(self.norm2(x_BSD))


class TextFusion(nn.Module):
    """Fuses K tapped encoder layers per token into one text sequence.

    `layerwise` blocks attend across the K layers of each token on its own
    (a batch of B·T sequences of length K, no mask: every layer is valid),
    `collapse` is a learned K→1 mix, `refiner` blocks attend across tokens
    with the key-padding mask.

    `reuse_output` (sampling, set by trainer.sample.fast_sampling): without gradients, a
    call with the same text and mask as the one before (equal values, checked on the
    device) returns that call's output: the text path does not depend on the image or
    the time, so it runs once per prompt batch instead of once per sampling step.
    """

    reuse_output = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._last = None  # (text, mask, output) of the last call under reuse_output

        def block():
            return TextBlock(cfg.text_dim, cfg.text_num_heads, cfg.text_num_kv_heads, cfg.text_mlp_hidden, cfg.norm_eps)

        self.layerwise = nn.ModuleList([block() for _ in range(cfg.num_layerwise_blocks)])
        self.collapse = nn.Linear(cfg.num_text_layers, 1, bias=False)
        self.refiner = nn.ModuleList([block() for _ in range(cfg.num_refiner_blocks)])

    def forward(self, text_BTKD: torch.Tensor, mask_B11T: torch.Tensor | None) -> torch.Tensor:
        reuse = self.reuse_output and not torch.is_grad_enabled()
        if reuse and self._last is not None and _same(self._last[0], text_BTKD) and _same(self._last[1], mask_B11T):
            return self._last[2]
        h_BTD = self._fuse(text_BTKD, mask_B11T)
        self._last = (text_BTKD, mask_B11T, h_BTD) if reuse else None
        return h_BTD

    def _fuse(self, text_BTKD: torch.Tensor, mask_B11T: torch.Tensor | None) -> torch.Tensor:
        B, T, K, D = text_BTKD.shape
        h_NKD = text_BTKD.reshape(B * T, K, D)
        for block in self.layerwise:
            h_NKD = block(h_NKD)
        h_BTDK = h_NKD.view(B, T, K, D).transpose(2, 3)
        h_BTD = self.collapse(h_BTDK).squeeze(-1)
        for block in self.refiner:
            h_BTD = block(h_BTD, mask_B11T)
        return h_BTD


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


class TextIn(nn.Module):
    """RMSNorm → Linear → GELU(tanh) → Linear: fused text features into the model width."""

    def __init__(self, text_dim: int, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(text_dim, eps)
        self.fc1 = nn.Linear(text_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x_BTE: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x_BTE)), approximate="tanh"))


class DiTBlock(nn.Module):
    """Single-stream block with shared adaLN modulation.

    `mod` is this block's (6, D) table added to the shared time projection:
    rows are (pre scale, pre shift, pre gate, post scale, post shift, post gate).
    Gates are raw (no tanh, no 1+), so zero gates make the block the identity.
    """

    float8_rows = False  # set by trainer.model.fp8_kernels.convert_block (sampling)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mod = nn.Parameter(torch.zeros(6, cfg.dim))
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(
        self,
        x_BSD: torch.Tensor,
        tmod_B6D: torch.Tensor,
        cos_SP: torch.Tensor,
        sin_SP: torch.Tensor,
        mask=None,
    ) -> torch.Tensor:
        """`mask`: the key mask in the form `K2DiT.attention` chose (trainer/model/attention.py)."""
        if self.float8_rows:
            return float8_block_forward(self, x_BSD, tmod_B6D, cos_SP, sin_SP, mask)
        m_B61D = (tmod_B6D + self.mod).unsqueeze(2)
        pre_scale, pre_shift, pre_gate, post_scale, post_shift, post_gate = m_B61D.unbind(1)
        h = (1.0 + pre_scale) * self.norm1(x_BSD) + pre_shift
        x_BSD = x_BSD + pre_gate * self.attn(h, cos_SP, sin_SP, mask)
        h = (1.0 + post_scale) * self.norm2(x_BSD) + post_shift
        return x_BSD + post_gate * self.mlp(h)


def float8_block_forward(block: DiTBlock, x_BSD, tmod_B6D, cos_SP, sin_SP, mask=None) -> torch.Tensor:
    """`DiTBlock.forward` for sampling with e4m3 block linears (trainer/model/fp8_kernels.py):
    each linear's input is produced and quantised per row by one fused kernel."""
    m_B61D = (tmod_B6D + block.mod).unsqueeze(2)
    pre_scale, pre_shift, pre_gate, post_scale, post_shift, post_gate = m_B61D.unbind(1)
    attn, mlp = block.attn, block.mlp
    _, h8, h_scale = norm_quant(x_BSD, block.norm1.weight, pre_scale, pre_shift, block.norm1.eps)
    q_BSD, k_BSD, v_BSD, gate_BSD = attn.split_qkvg(attn.qkvg.mm(h8, h_scale))
    o_BHSK = attn.attend_projected(q_BSD, k_BSD, v_BSD, cos_SP, sin_SP, mask)
    attn_BSD = attn.out.mm(*gate_quant(o_BHSK, gate_BSD))
    x_BSD, h8, h_scale = norm_quant(x_BSD, block.norm2.weight, post_scale, post_shift, block.norm2.eps,
                                    residual=attn_BSD, gate=pre_gate)
    return x_BSD + post_gate * mlp.w_down.mm(*swiglu_quant(mlp.w_gate_up.mm(h8, h_scale)))


class FinalLayer(nn.Module):
    """Modulated RMSNorm + linear to the patch channels; modulation = raw temb + (2, D) table."""

    def __init__(self, dim: int, out_channels: int, eps: float):
        super().__init__()
        self.mod = nn.Parameter(torch.zeros(2, dim))
        self.norm = RMSNorm(dim, eps)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x_BLD: torch.Tensor, temb_BD: torch.Tensor) -> torch.Tensor:
        m_B21D = (temb_BD[:, None, :] + self.mod).unsqueeze(2)
        scale, shift = m_B21D.unbind(1)
        return self.linear((1.0 + scale) * self.norm(x_BLD) + shift)


# ---------------------------------------------------------------- the model


class K2DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.dim
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_mlp = TimeMLP(cfg.timestep_dim, d)
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_fusion = TextFusion(cfg)
        self.text_in = TextIn(cfg.text_dim, d, cfg.norm_eps)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_blocks)])
        self.final = FinalLayer(d, cfg.in_channels, cfg.norm_eps)
        # Trainable extras that objectives attach before parallelisation (e.g. the iREPA
        # projector). Empty by default, so state dicts match the release; they live in the
        # model so FSDP, the optimizer, EMA and checkpoints pick them up, and interop
        # drops `aux.*` on export.
        self.aux = nn.ModuleDict()
        # How the main blocks attend under the text key mask (trainer/model/attention.py):
        # "auto" (= "sdpa", dense), "flex", "cudnn" or "varlen".
        # A runtime choice, not part of the architecture: every backend computes the same function.
        self.attention = "auto"

    def forward(
        self,
        x_BLC: torch.Tensor,
        text_BTKD: torch.Tensor,
        t_B: torch.Tensor,
        pos_S3: torch.Tensor,
        text_mask_BT: torch.Tensor | None = None,
        return_hidden_block: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity for the image tokens.

        x_BLC: patchified noisy latents; text_BTKD: stacked encoder hidden
        states; t_B: flow time in [0, 1] (1 = noise); pos_S3: `positions(T, h, w)`;
        text_mask_BT: True for valid text tokens, or None when all are valid
        (pass None rather than an all-True mask: no mask lets SDPA use flash).
        return_hidden_block: an index i returns (v_BLC, hidden_BLD), the image tokens
        of block i's output (for representation alignment). An output rather than a
        forward hook: it works whatever wraps the blocks (activation checkpointing
        re-runs a block's forward, compile and FSDP replace or re-class the module)
        and keeps no state between calls.
        """
        B, L, _ = x_BLC.shape
        T = text_BTKD.shape[1]
        if text_BTKD.shape[2:] != (self.cfg.num_text_layers, self.cfg.text_dim):
            raise ValueError(
                f"text features must be (B, T, {self.cfg.num_text_layers}, {self.cfg.text_dim}), "
                f"got {tuple(text_BTKD.shape)}"
            )
        if pos_S3.shape[0] != T + L:
            raise ValueError(f"pos_S3 has {pos_S3.shape[0]} rows, expected text {T} + image {L}")
        if return_hidden_block is not None and not 0 <= return_hidden_block < len(self.blocks):
            raise ValueError(f"return_hidden_block={return_hidden_block} but the model has {len(self.blocks)} blocks")

        temb_BD = self.time_mlp(t_B, x_BLC.dtype)
        tmod_B6D = self.time_proj(F.gelu(temb_BD, approximate="tanh")).unflatten(-1, (6, -1))

        text_mask_B11T = mask_BS = None
        if text_mask_BT is not None:
            text_mask_BT = text_mask_BT.bool()
            # Padded positions are never attended to, but 0·NaN = NaN inside
            # attention: zero them so garbage (or NaN) padding cannot leak in.
            text_BTKD = torch.where(text_mask_BT[:, :, None, None], text_BTKD, 0.0)
            # A sample without any valid text token (an all-padding row) leaves its
            # refiner queries nothing to attend to; some SDPA kernels return NaN
            # there, and a NaN value poisons later attention even where masked.
            # Such rows attend to their own zeroed padding instead; image tokens
            # never see padding either way.
            refiner_mask_BT = text_mask_BT | ~text_mask_BT.any(dim=1, keepdim=True)
            text_mask_B11T = refiner_mask_BT[:, None, None, :]
            mask_BS = torch.cat((text_mask_BT, text_mask_BT.new_ones(B, L)), dim=1)
        backend = resolve_backend(self.attention, x_BLC.device)

        text_BTD = self.text_in(self.text_fusion(text_BTKD, text_mask_B11T))
        if backend == "varlen" and text_mask_BT is not None:
            # Rows laid out [image | valid text | padding], so each row's valid tokens are
            # one contiguous segment (trainer/model/attention.py). The same function:
            # attention does not see token order beyond RoPE, whose text positions are all 0.
            text_BTD, valid_BT = valid_first(text_BTD, text_mask_BT)
            x_BSD = torch.cat((self.img_in(x_BLC), text_BTD), dim=1)
            pos_S3 = torch.cat((pos_S3[T:], pos_S3[:T]))
            mask, image = varlen_segments(valid_BT, L), slice(0, L)
        else:
            x_BSD = torch.cat((text_BTD, self.img_in(x_BLC)), dim=1)
            image = slice(T, None)
            if backend == "split" and text_mask_BT is not None:
                mask = split_key_padding(text_mask_BT)
            else:
                mask = key_padding(mask_BS, "sdpa" if backend in ("varlen", "split") else backend)

        cos_SP, sin_SP = rope_tables(pos_S3, self.cfg.rope_axes, self.cfg.rope_theta)
        hidden_BLD = None
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, tmod_B6D, cos_SP, sin_SP, mask)
            if i == return_hidden_block:
                hidden_BLD = x_BSD[:, image]
        v_BLC = self.final(x_BSD[:, image], temb_BD)
        return v_BLC if return_hidden_block is None else (v_BLC, hidden_BLD)

    # ------------------------------------------------------------ init and size

    @torch.no_grad()
    def init_weights(self, seed_or_generator: int | torch.Generator | None = None) -> None:
        """From-scratch initialisation, adaLN-Zero style.

        Linears: Xavier-uniform weights, zero biases (DiT); the time MLP gets
        N(0, 0.02) as in DiT. Norm weights zero (= scale 1). The shared time
        projection and every block's table are zero, so all gates are zero and
        each block starts as the identity; the final linear is zero, so the
        first prediction is v = 0. `collapse` starts as the mean over layers:
        a random K→1 mix would make the text signal arbitrary from step 0.

        An int seeds a forked RNG (works for CUDA and sharded DTensor params,
        which draw from the global RNG); a Generator must live on the params' device.
        """
        if isinstance(seed_or_generator, int):
            devices = sorted({p.device.index or 0 for p in self.parameters() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed_or_generator)
                self._init(None)
        else:
            self._init(seed_or_generator)

    def _init(self, gen: torch.Generator | None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.zeros_(module.weight)
        nn.init.normal_(self.time_mlp.fc1.weight, std=0.02, generator=gen)
        nn.init.normal_(self.time_mlp.fc2.weight, std=0.02, generator=gen)
        nn.init.constant_(self.text_fusion.collapse.weight, 1.0 / self.cfg.num_text_layers)
        for p in (self.time_proj.weight, self.time_proj.bias, self.final.mod, self.final.linear.weight, self.final.linear.bias):
            nn.init.zeros_(p)
        for block in self.blocks:
            nn.init.zeros_(block.mod)

    def num_params(self, blocks_only: bool = False) -> int:
        """Parameter count (works on the meta device); `blocks_only` counts the main blocks alone."""
        params = self.blocks.parameters() if blocks_only else self.parameters()
        return sum(p.numel() for p in params)


def build_on_meta(cfg: ModelConfig) -> K2DiT:
    """K2DiT with meta-device parameters: for counting, or for `to_empty` + load/init without double memory."""
    with torch.device("meta"):
        return K2DiT(cfg)
