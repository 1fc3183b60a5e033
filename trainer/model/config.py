"""Model hyperparameters. One dataclass; the named sizes live in configs/model/*.yaml."""

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name: str = "debug"
    # Latent space feeding the DiT: `latent_channels` channels, patchified by
    # `patch_size`, so the first linear sees latent_channels * patch_size**2.
    latent_channels: int = 16
    patch_size: int = 2
    dim: int = 6144  # transformer width = num_heads * head_dim
    num_blocks: int = 28
    num_heads: int = 48
    num_kv_heads: int = 12  # grouped-query attention
    mlp_hidden: int = 16384  # SwiGLU hidden width
    timestep_dim: int = 256  # sinusoid width before the time MLP
    # Text fusion: hidden states of `num_text_layers` encoder layers, each of
    # width `text_dim`, are fused per token, then refined across tokens.
    text_dim: int = 2560
    num_text_layers: int = 12
    text_num_heads: int = 20
    text_num_kv_heads: int = 20
    text_mlp_hidden: int = 6912
    num_layerwise_blocks: int = 2
    num_refiner_blocks: int = 2
    rope_axes: list[int] = field(default_factory=lambda: [32, 48, 48])  # (frame, height, width) split of head_dim
    rope_theta: float = 1000.0
    norm_eps: float = 1e-5

    @property
    def in_channels(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> None:
        counts = ("latent_channels", "patch_size", "dim", "num_blocks", "num_heads", "num_kv_heads", "mlp_hidden",
                  "timestep_dim", "text_dim", "num_text_layers", "text_num_heads", "text_num_kv_heads",
                  "text_mlp_hidden", "rope_theta", "norm_eps")
        for key in counts:
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("num_layerwise_blocks", "num_refiner_blocks"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}")
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"sum(model.rope_axes)={sum(self.rope_axes)} must equal head_dim={self.head_dim}")
        if any(a % 2 for a in self.rope_axes):
            raise ValueError(f"model.rope_axes={self.rope_axes} must all be even")
        if self.text_dim % self.text_num_heads or self.text_num_heads % self.text_num_kv_heads:
            raise ValueError("model.text_dim must divide by text_num_heads, and text_num_heads by text_num_kv_heads")
