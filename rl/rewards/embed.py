"""Image embeddings for the artifact and diversity rewards: the open_clip towers of data.embeddings.

`ImageEmbedder.load("ViT-B-32", pretrained="laion2b_s34b_b79k")` builds a tower the way
open_clip does (`pretrained` a tag, a checkpoint path, or None for random weights from
`init_seed`) and embeds RGB uint8 images (B, H, W, 3) as L2-normalised float32 (B, D)
vectors. The rewards and curation share one tower code path; the tests and the demo use
the tiny random tower DEFAULT_MODEL (see data.embeddings.TINY_MODELS for why that one).
"""

from data.embeddings import DEFAULT_MODEL, TINY_MODELS, register_model_config
from data.embeddings import OpenClipEmbedder as ImageEmbedder

__all__ = ["DEFAULT_MODEL", "TINY_MODELS", "ImageEmbedder", "register_model_config"]
