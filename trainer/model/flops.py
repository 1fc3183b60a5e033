"""Training FLOPs per sample of K2DiT, for MFU.

Counted from the config, not from parameters: 2 FLOPs per multiply-accumulate
of every matmul, and training = forward + backward = 3 × forward. Attention
scores and the weighted sum cost 2·S²·D MACs per block (all heads together),
hence the familiar `6·N·S + 12·num_blocks·D·S²`. Padded text tokens are
counted: the hardware computes them. Elementwise work (norms, RoPE, softmax,
modulation) is left out, as is usual for MFU.
"""

from trainer.model.config import ModelConfig


def _linear_macs_per_token(dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int) -> int:
    """MACs of one block's linears for one token: q, gate, out (d×d), k, v (d×kv), SwiGLU (3·d×hidden)."""
    kv_dim = num_kv_heads * (dim // num_heads)
    return 3 * dim * dim + 2 * dim * kv_dim + 3 * dim * mlp_hidden


def flops_per_sample(cfg: ModelConfig, text_tokens: int, image_tokens: int) -> float:
    T, L, d = text_tokens, image_tokens, cfg.dim
    S = T + L
    K, e = cfg.num_text_layers, cfg.text_dim

    main = cfg.num_blocks * (_linear_macs_per_token(d, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_hidden) * S + 2 * S * S * d)

    text_block = _linear_macs_per_token(e, cfg.text_num_heads, cfg.text_num_kv_heads, cfg.text_mlp_hidden)
    # Layerwise blocks run on B·T sequences of K tokens each; the refiner on one sequence of T.
    layerwise = cfg.num_layerwise_blocks * T * (text_block * K + 2 * K * K * e)
    refiner = cfg.num_refiner_blocks * (text_block * T + 2 * T * T * e)
    collapse = T * e * K
    text_in = T * (e * d + d * d)

    image_io = 2 * L * cfg.in_channels * d  # img_in and the final linear
    time = cfg.timestep_dim * d + d * d + 6 * d * d  # time MLP and shared projection: once per sample

    forward_macs = main + layerwise + refiner + collapse + text_in + image_io + time
    return 3.0 * 2.0 * forward_macs
