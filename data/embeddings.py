"""Image embeddings for curation: open_clip towers (SigLIP-2, CLIP) and DINOv3, and their store.

    embedder = build_embedder("open_clip", "ViT-B-16-SigLIP2", pretrained="webli", device="cuda")
    embedder = build_embedder("dinov3", "dinov3-vitb16", pretrained="/ckpt/dinov3-vitb16-pretrain-lvd1689m")
    emb_BD = embedder(images_BHWC)                    # uint8 RGB in, float32 L2-normalised out (CPU)
    write_embeddings(folder, "chunk-000017", keys, emb_BD, embedder.meta())
    keys, emb_ND, meta = read_embeddings(folder, expect_dim=768, model=embedder.name, version=embedder.version)

Every embedder has a `name` (family/model), a `version` and a width `dim`. The version is
a digest of the tower's weights and preprocessing, so it is the same on every worker that
loads the same checkpoint (a path's mtime would not be) and changes whenever the weights
do: a classifier trained on one tower's embeddings refuses another's (check_embedding_meta).

pretrained=None builds the architecture with random weights drawn from `init_seed`: the
tests and the demo use that with the tiny configs this module registers (TINY_MODELS for
open_clip, TINY_DINOV3 for DINOv3); a real run names trained weights.

The store holds one file per chunk, `<chunk>.emb.safetensors`: the float32 (N, D)
embeddings, and in its header the keys (one per row), the model name, version and width.
Files are written to a temporary name and renamed, so a reader sees a whole chunk or none,
and a retried job overwrites its chunk with the same bytes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FAMILIES = ("open_clip", "dinov3")

# open_clip architecture configs (embed_dim, vision_cfg, text_cfg: open_clip wants a text
# tower in every config, so each has a one-layer one). "k2-tiny-resnet": timm's resnet14t
# (a deep stem, four stages of one bottleneck each, 9 M parameters) on 64 px inputs, average
# pool, a linear projection to 512-d. Chosen for a random tower's embeddings: measured on
# the artifact head (shapes world, 32 px images resized to 64, 384 training / 128 held-out),
# open_clip's tiny ViTs (1-2 layers, width 64-128) reached 0.5-0.7 held-out accuracy per
# corruption kind, its ModifiedResNet (width 32, 64 px) 0.84-0.95, timm's MobileNetV3 and
# LCNet under 0.65, this tower 0.95-0.99, at ~3 ms an image on 2 CPU threads.
TINY_MODELS: dict[str, dict] = {
    "k2-tiny-resnet": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 64, "timm_model_name": "resnet14t", "timm_pool": "avg", "timm_proj": "linear"},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
    },
}
DEFAULT_MODEL = "k2-tiny-resnet"

# transformers DINOv3ViTConfig fields for a DINOv3 small enough for tests: 2 layers of
# width 64 over 8 px patches of a 32 px image, with 2 register tokens as the released
# models have (4), so the CLS token is not simply the first of the patch tokens.
TINY_DINOV3: dict[str, dict] = {
    "k2-tiny-dinov3": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "patch_size": 8, "image_size": 32, "num_register_tokens": 2},
}


def register_model_config(name: str, config: dict) -> None:
    """Make `name` an open_clip model with architecture `config` (a no-op if it already is).

    ValueError if open_clip already knows `name` with another config: a saved head or a
    run must not silently get a different tower under the same name.
    """
    config = json.loads(json.dumps(config))  # as open_clip reads it back from JSON (tuples -> lists)
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) != config:
            raise ValueError(f"open_clip already has a model {name!r} with another config: "
                             f"{open_clip.get_model_config(name)} (asked: {config})")
        return
    with tempfile.TemporaryDirectory() as folder:
        # open_clip keeps the configs it has read; the file is not needed once registered.
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


def weights_digest(module: torch.nn.Module, extra: str = "") -> str:
    """sha256 over the module's state dict (names, dtypes, shapes, bytes, in name order) and
    `extra`, first 16 hex digits: equal on every machine for equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    h.update(extra.encode())
    return "sha256:" + h.hexdigest()[:16]


class Embedder:
    """Images (B, H, W, 3) uint8 RGB -> L2-normalised float32 (B, D) on the CPU, `batch_size`
    images per forward. Subclasses give `_pixels` (a batch of images -> the tower's input on
    its device) and `_features` (input -> (b, D) features)."""

    family = ""

    def __init__(self, tower: torch.nn.Module, settings: dict, version: str, batch_size: int = 64, amp: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tower = tower.eval().requires_grad_(False)
        self.settings = settings
        self.version = version
        self.batch_size = batch_size
        # bf16 autocast on CUDA: the benchmarked speed; embeddings move by ~1e-3 cosine.
        self.amp = amp

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @property
    def name(self) -> str:
        return f"{self.family}/{self.settings['model']}"

    @property
    def dim(self) -> int:
        return self.settings["embed_dim"]

    def meta(self) -> dict:
        """What the store and the classifiers record about the embeddings this gives."""
        return {"model": self.name, "version": self.version, "dim": self.dim, "pretrained": self.settings["pretrained"]}

    @torch.no_grad()
    def __call__(self, images_BHWC: np.ndarray) -> torch.Tensor:
        images_BHWC = np.asarray(images_BHWC)
        if images_BHWC.dtype != np.uint8 or images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
            raise ValueError(f"embedders take RGB uint8 images (B, H, W, 3), got {images_BHWC.dtype} "
                             f"{images_BHWC.shape}")
        if not len(images_BHWC):
            raise ValueError("no images to embed")
        out = []
        use_amp = self.amp and self.device.type == "cuda"
        for start in range(0, len(images_BHWC), self.batch_size):
            pixels = self._pixels(images_BHWC[start:start + self.batch_size])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                features = self._features(pixels)
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    def _pixels(self, images_bHWC: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OpenClipEmbedder(Embedder):
    """An open_clip image tower and its evaluation transform (CLIP's `encode_image(normalize=True)`)."""

    family = "open_clip"

    def __init__(self, visual: torch.nn.Module, preprocess, settings: dict, version: str, batch_size: int = 64,
                 amp: bool = False):
        super().__init__(visual, settings, version, batch_size, amp)
        self.preprocess = preprocess

    @property
    def visual(self) -> torch.nn.Module:
        return self.tower

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | torch.device = "cpu",
             init_seed: int = 0, model_config: dict | None = None, batch_size: int = 64,
             amp: bool = False) -> "OpenClipEmbedder":
        """open_clip's `model` with weights `pretrained` (a tag, a checkpoint path, or None: random
        from `init_seed`). `model_config` registers `model` first (a saved head carries its
        tower's config); TINY_MODELS are registered when named."""
        if model_config is None and model in TINY_MODELS:
            model_config = TINY_MODELS[model]
        if model_config is not None:
            register_model_config(model, model_config)
        if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"open_clip has no model {model!r}: pick one of open_clip.list_models() "
                             f"or {sorted(TINY_MODELS)}")
        # Built on the CPU (the CPU generator alone decides a random tower, and the digest
        # reads the weights there), then moved; forked so the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        visual = clip.visual  # the text tower goes with `clip`
        settings = {"model": model, "pretrained": pretrained, "init_seed": init_seed,
                    "model_config": open_clip.get_model_config(model),
                    "image_size": list(np.broadcast_to(visual.image_size, 2).tolist()), "normalize": True}
        # The version stays out of `settings`, which saved artifact heads compare whole.
        embedder = cls(visual.to(device), preprocess, settings, weights_digest(visual, repr(preprocess)),
                       batch_size=batch_size, amp=amp)
        # The width as the tower computes it (ViT, ResNet and timm towers name it differently).
        settings["embed_dim"] = int(embedder(np.zeros((1, *settings["image_size"], 3), np.uint8)).shape[1])
        return embedder

    def _pixels(self, images_bHWC: np.ndarray) -> torch.Tensor:
        return torch.stack([self.preprocess(Image.fromarray(image)) for image in images_bHWC]).to(self.device)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(pixels)


class DinoV3Embedder(Embedder):
    """A transformers DINOv3 ViT: the CLS token after the final norm (`pooler_output`), its
    image processor's resize and ImageNet normalisation."""

    family = "dinov3"

    def __init__(self, model: torch.nn.Module, processor, settings: dict, version: str, batch_size: int = 64,
                 amp: bool = False):
        super().__init__(model, settings, version, batch_size, amp)
        self.processor = processor

    @classmethod
    def load(cls, model: str, pretrained: str | None = None, device: str | torch.device = "cpu", init_seed: int = 0,
             model_config: dict | None = None, batch_size: int = 64, amp: bool = False) -> "DinoV3Embedder":
        """`pretrained`: a transformers checkpoint (folder or hub id) read with from_pretrained,
        its image processor with it; `model` names it in the store. pretrained=None: random
        weights from `init_seed` for the architecture `model_config`, a TINY_DINOV3 name, or
        a folder holding a config.json."""
        from transformers import AutoConfig, AutoImageProcessor, DINOv3ViTConfig, DINOv3ViTImageProcessor, \
            DINOv3ViTModel

        if pretrained is not None:
            net = DINOv3ViTModel.from_pretrained(pretrained)
            processor = AutoImageProcessor.from_pretrained(pretrained)
        else:
            if model_config is None and model in TINY_DINOV3:
                model_config = TINY_DINOV3[model]
            if model_config is not None:
                config = DINOv3ViTConfig(**model_config)
            elif Path(model, "config.json").is_file():
                config = AutoConfig.from_pretrained(model)
            else:
                raise ValueError(f"no DINOv3 architecture {model!r}: give pretrained=<checkpoint>, "
                                 f"model_config, a folder with config.json, or one of {sorted(TINY_DINOV3)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                net = DINOv3ViTModel(config)
            size = config.image_size
            processor = DINOv3ViTImageProcessor(size={"height": size, "width": size})
        settings = {"model": model, "pretrained": pretrained, "init_seed": init_seed,
                    "model_config": net.config.to_diff_dict(), "embed_dim": int(net.config.hidden_size)}
        settings["model_config"].pop("transformers_version", None)
        version = weights_digest(net, json.dumps(processor.to_dict(), sort_keys=True, default=str))
        return cls(net.to(device), processor, settings, version, batch_size=batch_size, amp=amp)

    def _pixels(self, images_bHWC: np.ndarray) -> torch.Tensor:
        return self.processor(images=list(images_bHWC), return_tensors="pt",
                              input_data_format="channels_last")["pixel_values"].to(self.device)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixels).pooler_output


def build_embedder(family: str, model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 64, init_seed: int = 0, model_config: dict | None = None,
                   amp: bool = False) -> Embedder:
    """The embedder of `family` ("open_clip": SigLIP-2 and CLIP towers; "dinov3"); see
    OpenClipEmbedder.load and DinoV3Embedder.load for what `model` and `pretrained` name."""
    loaders = {"open_clip": OpenClipEmbedder.load, "dinov3": DinoV3Embedder.load}
    if family not in loaders:
        raise ValueError(f"unknown embedder family {family!r}: families are {list(FAMILIES)}")
    return loaders[family](model, pretrained, device=device, init_seed=init_seed, model_config=model_config,
                           batch_size=batch_size, amp=amp)


def check_embedding_meta(expected: dict, got: dict, where: str) -> None:
    """ValueError naming `where` unless `got` (model, version, dim) matches `expected`."""
    for field in ("model", "version", "dim"):
        if field in got and got[field] != expected[field]:
            raise ValueError(f"{where} expects embeddings of {expected['model']} (version {expected['version']}, "
                             f"dim {expected['dim']}), got {field} {got[field]!r}")


def check_width(emb_ND, dim: int, where: str) -> torch.Tensor:
    """`emb_ND` (numpy or torch) as float32 torch (N, dim); ValueError naming `where` otherwise."""
    emb = torch.as_tensor(np.asarray(emb_ND) if not isinstance(emb_ND, torch.Tensor) else emb_ND)
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise ValueError(f"{where} takes embeddings (N, {dim}), got shape {tuple(emb.shape)}")
    return emb.float()


# ---- one file of tensors and JSON metadata ------------------------------------------------------
def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor | np.ndarray], meta: dict) -> Path:
    """`tensors` and `meta` (JSON) into the safetensors file `path`, atomically: written to a
    temporary name in the same folder, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        data = {k: torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v).contiguous()
                for k, v in tensors.items()}
        save_file(data, str(tmp), metadata={"k2": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # safetensors' 0600 would hide it from other users' workers
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_tensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, np.ndarray], dict]:
    """(numpy tensors, meta) of a file save_tensors wrote; ValueError naming `path` if it is
    missing, truncated or not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads(f.metadata()["k2"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what} {path} is damaged or truncated ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{what} {path} is damaged: its metadata is not a JSON object")
    return tensors, meta


# ---- the embedding store ----------------------------------------------------------------------
SUFFIX = ".emb.safetensors"
STORE_FORMAT = "k2-embeddings-1"
_CHUNK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def chunk_path(folder: str | os.PathLike, chunk_name: str) -> Path:
    if not _CHUNK_NAME.fullmatch(chunk_name):
        raise ValueError(f"chunk name {chunk_name!r} must be letters, digits, '.', '_' or '-' (not starting with '.')")
    return Path(folder) / f"{chunk_name}{SUFFIX}"


def write_embeddings(folder: str | os.PathLike, chunk_name: str, keys: list[str], emb_ND, meta: dict) -> Path:
    """One chunk's embeddings (float32 (N, D), row i for keys[i]) into `folder`, with `meta`
    (at least model, version and dim: an embedder's .meta()). Replaces the chunk if present."""
    path = chunk_path(folder, chunk_name)
    emb = check_width(emb_ND, int(meta["dim"]), f"embedding file {path} (meta dim {meta['dim']})")
    keys = [str(k) for k in keys]
    if len(keys) != len(emb):
        raise ValueError(f"embedding file {path}: {len(keys)} keys for {len(emb)} rows")
    _check_unique(keys, path)
    for field in ("model", "version"):
        if not meta.get(field):
            raise ValueError(f"embedding file {path}: meta needs {field!r} (an embedder's .meta()), got {meta}")
    record = {**meta, "format": STORE_FORMAT, "chunk": chunk_name, "count": len(keys), "keys": keys}
    return save_tensors(path, {"embeddings": emb.detach().cpu()}, record)


def read_chunk(path: str | os.PathLike, expect_dim: int | None = None, model: str | None = None,
               version: str | None = None) -> tuple[list[str], np.ndarray, dict]:
    """(keys, float32 (N, D), meta) of one chunk file; ValueError naming it if missing, damaged,
    or not what was asked."""
    path = Path(path)
    tensors, meta = load_tensors(path, "embedding file")
    emb, keys = tensors.get("embeddings"), meta.get("keys")
    if meta.get("format") != STORE_FORMAT or emb is None or not isinstance(keys, list):
        raise ValueError(f"embedding file {path} is not a {STORE_FORMAT} chunk (format {meta.get('format')!r})")
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise ValueError(f"embedding file {path} holds {emb.dtype} {emb.shape}, not float32 (N, D)")
    if emb.shape[1] != meta.get("dim"):
        raise ValueError(f"embedding file {path} holds {emb.shape[1]}-d rows but its meta says dim {meta.get('dim')}")
    if expect_dim is not None and emb.shape[1] != expect_dim:
        raise ValueError(f"embedding file {path} holds {emb.shape[1]}-d embeddings, expected {expect_dim}")
    for field, want in (("model", model), ("version", version)):
        if want is not None and meta.get(field) != want:
            raise ValueError(f"embedding file {path} is from {field} {meta.get(field)!r}, expected {want!r}")
    if len(keys) != len(emb):
        raise ValueError(f"embedding file {path} has {len(keys)} keys for {len(emb)} rows")
    _check_unique(keys, path)
    meta = {k: v for k, v in meta.items() if k != "keys"}
    return keys, emb, meta


def read_embeddings(folder: str | os.PathLike, expect_dim: int | None = None, model: str | None = None,
                    version: str | None = None, chunks: list[str] | None = None) -> tuple[list[str], np.ndarray, dict]:
    """(keys, float32 (N, D), meta) over the chunks of `folder` in sorted chunk order (or the
    named `chunks`, each of which must exist). All chunks must share one model, version and
    dim (the first chunk's, or the ones asked), and no key may appear twice. meta: the
    first chunk's, with "chunks": the chunk names read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"embedding folder {folder} does not exist")
    if chunks is None:
        paths = sorted(folder.glob(f"[!.]*{SUFFIX}"))
        if not paths:
            raise ValueError(f"embedding folder {folder} holds no *{SUFFIX} chunks")
    else:
        paths = [chunk_path(folder, c) for c in sorted(chunks)]
    all_keys: list[str] = []
    arrays, seen, first = [], {}, None
    for path in paths:
        keys, emb, meta = read_chunk(path, expect_dim, model, version)
        if first is None:
            first = meta
            expect_dim, model, version = meta["dim"], meta["model"], meta["version"]
        for key in keys:
            if key in seen:
                raise ValueError(f"key {key!r} is in both embedding files {seen[key]} and {path}")
            seen[key] = path
        all_keys += keys
        arrays.append(emb)
    first = {**first, "chunks": [p.name[:-len(SUFFIX)] for p in paths], "count": len(all_keys)}
    first.pop("chunk", None)
    return all_keys, np.concatenate(arrays), first


def _check_unique(keys: list[str], path: Path) -> None:
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"embedding file {path}: key {dup!r} appears more than once")
