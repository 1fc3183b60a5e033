"""Attention kernels for the key-padding mask of the text tokens.

A padded prompt gives every attention call of the main blocks a boolean key mask
(B, 1, 1, S). Plain SDPA then cannot use flash attention: it falls back to the
memory-efficient kernel, which does not take `enable_gqa`, so K/V heads are repeated
first. Other ways to attend to the same keys, chosen per call by the type of the
mask argument of `attend`:

- `varlen`: variable-length flash attention. K2DiT lays each row out as
  [image | valid text | padding], so a row is two contiguous segments of the
  flattened batch (`Varlen`); the valid one attends exactly as under the mask.
  No mask is read and the kernel shares K/V heads among their query heads.
- `flex`: FlexAttention with a BlockMask built from the mask. Key blocks of 128
  that are all valid run unmasked, blocks that are all padding are skipped, the one
  or two partial blocks per sample evaluate the mask; GQA inside the kernel.
- `cudnn`: cuDNN's fused attention, which takes the boolean mask itself.
- `split`: the keys in two parts, merged exactly by their log-sum-exps. K2DiT lays a
  row out [text | image]: the image keys are all valid, so that part (nine tenths of
  the keys at 1024²) runs in flash attention without a mask; only the T text keys go
  through the masked kernel. The backward gives each part the merged output and
  log-sum-exp (as ring attention does), so it is the gradient of one softmax.

Each computes the function of the dense path (softmax over the valid keys) for every
output that is read, so they are interchangeable; tests/trainer/test_fast_paths.py
checks them against a float64 softmax on CPU (varlen through its per-segment
reference there). The names below are what `K2DiT.attention` accepts.

Measured on an H200 with torch 2.11 at the 2b shape (docs/BENCHMARKS.md, "GPU
performance on one H200"): forward + backward, flex 380 TFLOP/s, cuDNN 355, dense 351,
varlen 306, split 243, against 535 for flash without any mask. So compiled CUDA blocks
use flex (trainer/stage.py's build_dit) and everything else the dense path.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "flex", "cudnn", "varlen", "split")
FLEX_BLOCK = 128  # FlexAttention's default tile: the granularity at which padding is skipped


class Cudnn(NamedTuple):
    """Attend with cuDNN's kernel: `mask_B11S` (True = attend) or None for no mask."""

    mask_B11S: torch.Tensor | None


class Varlen(NamedTuple):
    """Segments of the flattened (B·S) sequence for variable-length flash attention.

    The sequence of each row must be laid out [image | valid text | padding] (K2DiT does
    this for the varlen backend: `valid_first`): row b is then two contiguous segments,
    its L + n_b valid tokens, which attend to each other exactly as under the key mask,
    and its T - n_b padding tokens, which attend among themselves (their outputs are
    never read, and padded text features are zero, so they stay finite).
    """

    cu_seqlens: torch.Tensor  # (2B + 1,) int32 offsets: valid_0, padding_0, valid_1, ...
    max_len: int  # S, an upper bound of every segment (no host sync to find the longest)


class Split(NamedTuple):
    """Keys [0, T) are text, `bias_B11T` 0 where valid and -inf at padding; keys [T, S)
    are image tokens, all valid."""

    text_tokens: int
    bias_B11T: torch.Tensor


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto" is the dense path: it needs no compilation and runs anywhere. FlexAttention
    pays off inside compiled blocks on CUDA, where trainer.stage.build_dit selects it."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {list(BACKENDS)}")
    if name == "varlen" and device.type == "cuda" and _varlen_attn() is None:
        raise ValueError("attention backend 'varlen' needs torch.nn.attention.varlen (torch >= 2.10)")
    return "sdpa" if name == "auto" else name


def valid_first(text_BTD: torch.Tensor, valid_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid tokens moved to the front, in order (a gather; text RoPE positions
    are all zero, so only the mask sees the order)."""
    order_BT = torch.argsort((~valid_BT).to(torch.uint8), dim=1, stable=True)
    return text_BTD.gather(1, order_BT[..., None].expand_as(text_BTD)), valid_BT.gather(1, order_BT)


def varlen_segments(valid_text_BT: torch.Tensor, image_tokens: int) -> Varlen:
    """`Varlen` for rows laid out [image (image_tokens) | text with its valid tokens first]."""
    B, T = valid_text_BT.shape
    n_B = valid_text_BT.sum(1, dtype=torch.int32)
    lengths = torch.stack((image_tokens + n_B, T - n_B), dim=1).flatten()
    return Varlen(F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), image_tokens + T)


def key_padding(valid_BS: torch.Tensor | None, backend: str):
    """The mask argument of `attend` for keys `valid_BS` (B, S) bool under `backend`
    ("sdpa", "flex" or "cudnn"); None (every key valid) stays None except for cuDNN."""
    if backend == "cudnn":
        return Cudnn(None if valid_BS is None else valid_BS[:, None, None, :])
    if valid_BS is None:
        return None
    if backend == "flex":
        return flex_key_padding(valid_BS)
    assert backend == "sdpa", backend
    return valid_BS[:, None, None, :]


def flex_key_padding(valid_BS: torch.Tensor, block: int = FLEX_BLOCK):
    """A FlexAttention BlockMask equal to the key mask `valid_BS` (B, S) for every query.

    Built from per-block counts rather than by evaluating the mask over S² pairs: a
    key block is full (all valid: no mask evaluated), partial (mask evaluated) or
    empty (not visited). Every query block sees the same key blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, S = valid_BS.shape
    n = -(-S // block)
    valid_BN = F.pad(valid_BS.bool(), (0, n * block - S))  # positions past S count as padding
    count_Bn = valid_BN.view(B, n, block).sum(-1)
    full_Bn = count_Bn == block
    partial_Bn = (count_Bn > 0) & ~full_Bn

    def listed(selected_Bn):
        # The selected blocks' indices first (ascending), then the rest; a count says how many are real.
        order_Bn = torch.argsort((~selected_Bn).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
        num_B11 = selected_Bn.sum(-1, dtype=torch.int32)[:, None, None]
        return num_B11.expand(B, 1, n).contiguous(), order_Bn[:, None, None, :].expand(B, 1, n, n).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return valid_BN[b, kv_idx]

    kv_num, kv_idx = listed(partial_Bn)
    full_num, full_idx = listed(full_Bn)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(S, S))


def split_key_padding(valid_text_BT: torch.Tensor) -> Split:
    """`Split` for rows laid out [text (T) | image]: the text keys' additive mask."""
    bias_BT = torch.zeros(valid_text_BT.shape, dtype=torch.float32, device=valid_text_BT.device)
    return Split(valid_text_BT.shape[1], bias_BT.masked_fill(~valid_text_BT.bool(), float("-inf"))[:, None, None, :])


_compiled_flex = None


def _flex(q, k, v, block_mask, enable_gqa: bool):
    """flex_attention, compiled: inside a compiled block it is traced with the block;
    called eagerly it goes through its own compiled wrapper (its eager form is an
    unfused reference that materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def attend(q_BHSK: torch.Tensor, k_BGSK: torch.Tensor, v_BGSK: torch.Tensor, mask=None) -> torch.Tensor:
    """Softmax attention of H query heads over G key/value heads (query head h reads kv
    head h // (H/G)). `mask`: None (all keys), a bool (B, 1, 1, S) tensor (dense SDPA), a
    FlexAttention BlockMask, or `Cudnn` (see `key_padding`)."""
    H, G = q_BHSK.shape[1], k_BGSK.shape[1]
    if mask is None:
        # No mask: flash attention handles GQA natively, no K/V copies.
        return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, enable_gqa=G != H)
    if isinstance(mask, Varlen):
        return _attend_varlen(q_BHSK, k_BGSK, v_BGSK, mask)
    if isinstance(mask, Split):
        if mask.text_tokens == 0:
            return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, enable_gqa=G != H)
        return _SplitAttention.apply(q_BHSK, k_BGSK, v_BGSK, mask.text_tokens, mask.bias_B11T.to(q_BHSK.dtype))
    if isinstance(mask, Cudnn):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, attn_mask=mask.mask_B11S, enable_gqa=G != H)
    if isinstance(mask, torch.Tensor):
        # With a mask, flash is out and the memory-efficient kernel does not take
        # `enable_gqa` (math would run instead and materialise the B·H·S² score matrix).
        # Repeating K/V heads costs one copy of K and V and keeps the efficient kernel.
        if G != H:
            B, _, S, K = k_BGSK.shape
            k_BGSK = k_BGSK[:, :, None].expand(B, G, H // G, S, K).reshape(B, H, S, K)
            v_BGSK = v_BGSK[:, :, None].expand(B, G, H // G, S, K).reshape(B, H, S, K)
        return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, attn_mask=mask)
    return _flex(q_BHSK, k_BGSK, v_BGSK, mask, G != H)


def _attend_varlen(q_BHSK, k_BGSK, v_BGSK, mask: Varlen) -> torch.Tensor:
    """Flash attention over the segments of `mask` (CUDA); elsewhere the same segments one
    SDPA call each (a reference for tests: it reads the offsets on the host)."""
    B, H, S, K = q_BHSK.shape
    G = k_BGSK.shape[1]
    q_NHK, k_NGK, v_NGK = (t.transpose(1, 2).reshape(B * S, t.shape[1], K) for t in (q_BHSK, k_BGSK, v_BGSK))
    fn = _varlen_attn()
    if q_BHSK.is_cuda and fn is not None:
        if G != H and not _takes_gqa(fn):
            k_NGK, v_NGK = (t.repeat_interleave(H // G, dim=1) for t in (k_NGK, v_NGK))
            o_NHK = fn(q_NHK, k_NGK, v_NGK, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len)
        else:
            o_NHK = fn(q_NHK, k_NGK, v_NGK, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len,
                       **({"enable_gqa": True} if G != H else {}))
    else:
        cu = mask.cu_seqlens.tolist()
        parts = []
        for start, end in zip(cu[:-1], cu[1:]):
            if end > start:
                seg = [t[start:end].transpose(0, 1)[None] for t in (q_NHK, k_NGK, v_NGK)]
                parts.append(F.scaled_dot_product_attention(*seg, enable_gqa=G != H)[0].transpose(0, 1))
        o_NHK = torch.cat(parts)
    return o_NHK.view(B, S, H, K).transpose(1, 2)


def _takes_gqa(fn) -> bool:
    import inspect

    return "enable_gqa" in inspect.signature(fn).parameters


# ---------------------------------------------------------------- split keys


def _repeat_kv(t_BGSK: torch.Tensor, H: int) -> torch.Tensor:
    B, G, S, K = t_BGSK.shape
    return t_BGSK if G == H else t_BGSK[:, :, None].expand(B, G, H // G, S, K).reshape(B, H, S, K)


def _fold_kv(t_BHSK: torch.Tensor, G: int) -> torch.Tensor:
    """The gradient of `_repeat_kv`: each kv head's query heads summed."""
    B, H, S, K = t_BHSK.shape
    return t_BHSK if G == H else t_BHSK.view(B, G, H // G, S, K).sum(2)


def _part_forward(q, k, v, bias):
    """One key part: (output, log-sum-exp (B, H, S) float32, tensors and values the
    backward needs)."""
    H = q.shape[1]
    if q.is_cuda and bias is None:
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        return out, lse, (cq, ck, seed, offset), ("flash", mq, mk)
    if q.is_cuda:
        # cuDNN: the memory-efficient kernel's backward, given this bias, read out of bounds.
        bias_BHST = bias.expand(q.shape[0], H, q.shape[2], k.shape[2])
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, _repeat_kv(k, H), _repeat_kv(v, H), bias_BHST, True)
        return out, lse.view(q.shape[:3]), (bias, cq, ck, seed, offset), ("cudnn", mq, mk, tuple(lse.shape))
    # Elsewhere (CPU tests): the same quantities in plain float32 arithmetic.
    s_BHST = _scores(q, k, bias)
    lse = torch.logsumexp(s_BHST, dim=-1)
    p_BHST = torch.exp(s_BHST - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhst,bhtk->bhsk", p_BHST, _repeat_kv(v, H).float()).to(q.dtype)
    return out, lse, (() if bias is None else (bias,)), ("math",)


def _scores(q, k, bias):
    s_BHST = torch.einsum("bhsk,bhtk->bhst", q.float(), _repeat_kv(k, q.shape[1]).float()) * q.shape[-1] ** -0.5
    return s_BHST if bias is None else s_BHST + bias.float()


def _part_backward(grad, q, k, v, out, lse, tensors, meta):
    """dq, dk, dv of one key part, given the merged output and log-sum-exp."""
    H, G = q.shape[1], k.shape[1]
    if meta[0] == "flash":
        cq, ck, seed, offset = tensors
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, meta[1], meta[2], 0.0, False, seed, offset)
    if meta[0] == "cudnn":
        bias, cq, ck, seed, offset = tensors
        bias_BHST = bias.expand(q.shape[0], H, q.shape[2], k.shape[2])
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, _repeat_kv(k, H), _repeat_kv(v, H), out, lse.reshape(meta[3]), seed, offset, bias_BHST,
            cq, ck, meta[1], meta[2], 0.0, False)
        return dq, _fold_kv(dk, G), _fold_kv(dv, G)
    bias = tensors[0] if tensors else None
    g, o = grad.float(), out.float()
    p_BHST = torch.exp(_scores(q, k, bias) - lse[..., None])
    dv = torch.einsum("bhst,bhsk->bhtk", p_BHST, g)
    ds_BHST = p_BHST * (torch.einsum("bhsk,bhtk->bhst", g, _repeat_kv(v, H).float()) - (g * o).sum(-1, keepdim=True))
    scale = q.shape[-1] ** -0.5
    dq = torch.einsum("bhst,bhtk->bhsk", ds_BHST, _repeat_kv(k, H).float()) * scale
    dk = torch.einsum("bhst,bhsk->bhtk", ds_BHST, q.float()) * scale
    return dq.to(q.dtype), _fold_kv(dk, G).to(k.dtype), _fold_kv(dv, G).to(v.dtype)


class _SplitAttention(torch.autograd.Function):
    """Softmax attention over keys [0, T) (masked by an additive bias) and [T, S) (no
    mask), computed as two kernels and merged by log-sum-exp; see `Split`."""

    @staticmethod
    def forward(ctx, q, k, v, T: int, bias):
        o_img, lse_img, t_img, m_img = _part_forward(q, k[:, :, T:], v[:, :, T:], None)
        o_txt, lse_txt, t_txt, m_txt = _part_forward(q, k[:, :, :T], v[:, :, :T], bias)
        lse = torch.logaddexp(lse_img, lse_txt)
        # A row with no valid text key has lse -inf there and a text output that is not a number.
        out = (o_img.float() * torch.exp(lse_img - lse)[..., None]
               + torch.nan_to_num(o_txt.float()) * torch.exp(lse_txt - lse)[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *t_img, *t_txt)
        ctx.T, ctx.n_img, ctx.meta = T, len(t_img), (m_img, m_txt)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        T, n = ctx.T, ctx.n_img
        grad = grad.contiguous()
        dq_i, dk_i, dv_i = _part_backward(grad, q, k[:, :, T:], v[:, :, T:], out, lse, rest[:n], ctx.meta[0])
        dq_t, dk_t, dv_t = _part_backward(grad, q, k[:, :, :T], v[:, :, :T], out, lse, rest[n:], ctx.meta[1])
        return dq_i + dq_t, torch.cat((dk_t, dk_i), dim=2), torch.cat((dv_t, dv_i), dim=2), None, None
