"""Typed config of the data side; Hydra fills it from configs/data/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # Which dataset: "shapes" is the procedural demo world (data/shapes.py); "shards" reads
    # latents + text features written by data/writer.py (docs/SHARDS.md) from `path`;
    # "synthetic" is random tensors for measuring the trainer.
    name: str = "shapes"
    # data.name="shards": the shard directory (holds index.json).
    path: str | None = None
    # data.name="shards": DataLoader worker processes reading shards (0 = in the training
    # process) and batches each worker keeps ready. The stream is the same for any count.
    num_workers: int = 2
    prefetch: int = 2
    # Side of the square training images in pixels (shapes needs >= 32). For shards, the
    # writer's --resolution: buckets hold about image_size² pixels (used for the FLOP count
    # and the sample grids).
    image_size: int = 32
    # Probability that a sample's caption is replaced by the empty prompt "", so the
    # model also learns the unconditional velocity that classifier-free guidance needs.
    caption_dropout: float = 0.1
    # Prompt tokens kept after the dropped chat-template system prefix (Krea 2 uses 512;
    # the longest shapes caption needs 15 including the template's closing tokens). Shards
    # are padded to this length; it must hold their longest prompt (the loader checks).
    text_len: int = 24
    # Folder of a Qwen3-VL checkpoint (tokenizer + model); None builds the tiny random
    # encoder into the run's cache dir.
    encoder_path: str | None = None
    # hidden_states indices to tap (0 = embeddings, i = output of decoder layer i);
    # Krea 2 on Qwen3-VL-4B taps [2, 5, ..., 35]; the tiny encoder has 4 layers.
    text_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # Seeds the world (which image each sample id is) and caption dropout; for shards,
    # the per-epoch shuffle and caption dropout.
    seed: int = 0
    # Latent space: "pixels" (demo) or "qwen_image" (needs vae_path: a VAE or pipeline folder).
    latents: str = "pixels"
    # latents="pixels": average-pool the image by this factor (decoding upsamples back).
    pixel_downsample: int = 1
    vae_path: str | None = None
    # The procedural world the samples come from, for sample-grid prompts and
    # `trainer.evaluate`: "shapes" (always for name=shapes; for shards written from
    # `shapes:N` inputs) or None.
    world: str | None = None
    # data.name="synthetic": the share of the text_len tokens that are valid (unpadded).
    synthetic_valid_text: float = 0.6

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {self.text_len}")
        if not self.text_layers:
            raise ValueError("text_layers must name at least one hidden state")
        if self.world not in (None, "shapes"):
            raise ValueError(f"world must be 'shapes' or null, got {self.world!r}")
        if self.num_workers < 0 or self.prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {self.num_workers} and {self.prefetch}")
