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
    # Latent space: "shapes_ae" (the demo's autoencoder, data/autoencoder.py), "pixels", or
    # "qwen_image" / "flux2"; all but pixels need vae_path (a VAE or pipeline folder).
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
    # data.name="shards": what is checked at start against index.json. "size": every shard
    # exists with its recorded size (cheap); "checksum": also the writer's SHA-256 of each.
    # Either way a bad shard set is refused before training, listing every bad shard.
    verify: str = "size"
    # data.name="shards": a sample whose latent has a NaN/inf or |x| >= this is skipped (its
    # shard and key in the log and skipped_samples.jsonl); latents are normalised to ~unit scale.
    max_abs_latent: float = 1e4
    # data.name="shards", midtraining: a per-sample weights file for this shard set
    # (data/weights.py). Each epoch then draws epoch_size samples with replacement, each with
    # probability proportional to its weight (a weight of 0: never drawn); None: every
    # sample once per epoch. The file is refused if written for another index.
    weights: str | None = None
    # With data.weights: draws per epoch (None: the index's total).
    epoch_size: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first bad key: "data.key must be ..., got X"."""
        rules = [
            ("name", self.name in ("shapes", "shards", "synthetic"), "shapes|shards|synthetic"),
            ("path", self.name != "shards" or bool(self.path), "set for data.name=shards (a shard directory)"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("prefetch", self.prefetch >= 1, ">= 1"),
            ("image_size", self.image_size >= (32 if self.name == "shapes" else 1),
             ">= 32 for data.name=shapes" if self.name == "shapes" else "> 0"),
            ("caption_dropout", 0.0 <= self.caption_dropout <= 1.0, "in [0, 1]"),
            ("text_len", self.text_len >= 1, ">= 1"),
            ("text_layers", bool(self.text_layers) and min(self.text_layers) >= 0,
             "a non-empty list of hidden-state indices >= 0"),
            ("latents", self.latents in ("pixels", "shapes_ae", "qwen_image", "flux2"),
             "pixels|shapes_ae|qwen_image|flux2"),
            ("vae_path", self.latents == "pixels" or self.name != "shapes" or bool(self.vae_path),
             f"set for data.latents={self.latents}"),
            ("pixel_downsample", self.pixel_downsample >= 1, ">= 1"),
            ("world", self.world in (None, "shapes"), "shapes or null"),
            ("synthetic_valid_text", 0.0 < self.synthetic_valid_text <= 1.0, "in (0, 1]"),
            ("verify", self.verify in ("size", "checksum"), "size|checksum"),
            ("max_abs_latent", self.max_abs_latent > 0, "> 0"),
            ("weights", self.weights is None or (self.name == "shards" and bool(self.weights)),
             "null, or a weights file (data/weights.py) with data.name=shards"),
            ("epoch_size", self.epoch_size is None or (self.epoch_size >= 1 and self.weights is not None),
             "null, or >= 1 with data.weights set"),
        ]
        for key, ok, rule in rules:
            if not ok:
                raise ValueError(f"data.{key} must be {rule}, got {getattr(self, key)!r}")
