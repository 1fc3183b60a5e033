"""LoRA files in three key namings, all safetensors.

For the base linear `blocks.0.attn.q` (K2DiT name; ΔW = alpha/rank · B A):

    k2train     blocks.0.attn.q.lora_A.weight                          alpha, rank in the metadata
    diffusers   transformer.transformer_blocks.0.attn.to_q.lora_A.weight   alpha/rank baked into B
    comfyui     diffusion_model.blocks.0.attn.wq.lora_down.weight      + .lora_up.weight, + .alpha

diffusers: `Krea2Pipeline.load_lora_weights` reads `transformer.<module>.lora_A/B.weight`
and, with no `lora_adapter_metadata` in the header, runs every adapter at alpha = rank
(W + B A). So B is stored pre-multiplied by alpha/rank, and loading at scale 1 gives
exactly our merged model.

comfyui: ComfyUI's model state dict is `diffusion_model.<release name>.weight`, and its
`model_lora_keys_unet` maps every such key, stripped of `.weight`, to itself (the
"generic lora format"), whatever the model. A LoRA of that name is read kohya-style:
`lora_up` (= B), `lora_down` (= A) and an optional scalar `alpha`, ΔW = alpha/rank · up·down.

    write_lora(sd, alpha=16.0, rank=8, path="style.safetensors", fmt="comfyui")
    sd, factor = read_lora("style.safetensors", cfg)        # any of the three, detected from the keys
    merge_lora(model, sd, factor * strength)
"""

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.lora import adapter_layers
from trainer.model.config import ModelConfig
from trainer.model.dit import build_on_meta
from trainer.model.interop import foreign_name

FORMATS = ("k2train", "diffusers", "comfyui")
DIFFUSERS_PREFIX = "transformer."
COMFY_PREFIX = "diffusion_model."
# safetensors metadata of a k2train LoRA file (values are strings)
META_ALPHA, META_RANK = "k2train.lora_alpha", "k2train.lora_rank"
# what diffusers writes into the header when it saves a LoRA (peft LoraConfig kwargs, JSON)
DIFFUSERS_META = "lora_adapter_metadata"

# Per format: the regex of one tensor name after the prefix → (module, part), part in A/B/alpha.
_PARTS = {
    "k2train": re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight"),
    "diffusers": re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight"),
    # lora_A/B under diffusion_model. too: the Krea 2 reference trainer's and ai-toolkit's naming
    "comfyui": re.compile(r"(?P<module>.+)\.(?:lora_(?P<part>down|up|A|B)\.weight|(?P<alpha>alpha))"),
}
_PART_OF = {"A": "A", "B": "B", "down": "A", "up": "B"}


# ---------------------------------------------------------------- names


def _module_name(module_ours: str, fmt: str) -> str:
    """The file's name of our linear `module_ours` (prefix included, no suffix)."""
    if fmt == "k2train":
        return module_ours
    layout = "diffusers" if fmt == "diffusers" else "release"
    prefix = DIFFUSERS_PREFIX if fmt == "diffusers" else COMFY_PREFIX
    return prefix + foreign_name(module_ours + ".weight", layout).removesuffix(".weight")


def _model_linears(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every linear a LoRA may adapt: our module name → weight shape (out, in)."""
    out = {}
    for name, module in build_on_meta(cfg).named_modules():
        if isinstance(module, nn.Linear) and not name.startswith("aux."):
            out[name] = tuple(module.weight.shape)
    return out


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS}")


# ---------------------------------------------------------------- writing


def to_lora_state_dict(sd_ours: dict[str, torch.Tensor], alpha: float, rank: int, fmt: str) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`<module>.lora_A/B.weight`) under `fmt`'s names."""
    _check_fmt(fmt)
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"LoRA rank and alpha must be positive, got rank={rank}, alpha={alpha}")
    out = {}
    for module, (A, B) in sorted(adapter_layers(sd_ours).items()):
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise ValueError(f"LoRA weight {module}: A {tuple(A.shape)} and B {tuple(B.shape)} are not rank {rank}")
        name = _module_name(module, fmt)
        if fmt == "k2train":
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = A, B
        elif fmt == "diffusers":
            # alpha/rank folded into B in float64: the only rounding is the cast back
            out[f"{name}.lora_A.weight"] = A
            out[f"{name}.lora_B.weight"] = (B.double() * (alpha / rank)).to(B.dtype)
        else:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = A, B
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def write_lora(sd_ours: dict[str, torch.Tensor], alpha: float, rank: int, path: str | os.PathLike, fmt: str) -> Path:
    """Writes our adapter tensors as a `fmt` LoRA file, atomically: the tensors go to
    `<path>.partial`, which is renamed to `path` once complete. Returns `path`."""
    tensors = to_lora_state_dict(sd_ours, alpha, rank, fmt)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "pt"}
    if fmt == "k2train":
        meta.update({META_ALPHA: repr(float(alpha)), META_RANK: str(int(rank))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=meta)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- reading


def _open(path: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"LoRA file {path} does not exist")
    if path.is_dir():  # a diffusers LoRA folder (pytorch_lora_weights.safetensors) or one file in a folder
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"LoRA folder {path}: expected one .safetensors file, found {len(files)}")
        path = files[0]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError) for a bad header
        raise ValueError(f"LoRA file {path} is not a safetensors file ({type(e).__name__}: {e})") from None
    if not tensors:
        raise ValueError(f"LoRA file {path} holds no tensors")
    return path, tensors, meta


def detect_lora_format(keys) -> str:
    """"diffusers" (transformer.…), "comfyui" (diffusion_model.…) or "k2train" (our names)."""
    keys = list(keys)
    if any(k.startswith(DIFFUSERS_PREFIX) for k in keys):
        return "diffusers"
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfyui"
    return "k2train"


def _prefix(fmt: str) -> str:
    return {"k2train": "", "diffusers": DIFFUSERS_PREFIX, "comfyui": COMFY_PREFIX}[fmt]


def _file_ratio(path: Path, fmt: str, meta: dict[str, str], ranks: set[int]) -> float | None:
    """alpha/rank of the whole file when it says so (None: per layer, or 1 by convention)."""
    if fmt == "k2train":
        if META_ALPHA not in meta:
            return 1.0  # peft's convention for a bare adapter file: W + B A
        alpha, rank = float(meta[META_ALPHA]), int(meta.get(META_RANK, 0))
        if ranks != {rank}:
            raise ValueError(f"LoRA file {path}: metadata says rank {rank}, the tensors have rank {sorted(ranks)}")
        return alpha / rank
    if fmt == "diffusers":
        raw = meta.get(DIFFUSERS_META)
        if not raw:
            return 1.0  # diffusers without metadata: alpha = rank
        cfg = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(raw).items()}
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora") or cfg.get("use_dora"):
            raise ValueError(f"LoRA file {path}: per-module rank/alpha patterns, rsLoRA and DoRA are not supported")
        if "lora_alpha" not in cfg or "r" not in cfg:
            return 1.0
        return float(cfg["lora_alpha"]) / float(cfg["r"])
    return None  # comfyui: each layer's own .alpha


def read_lora(path: str | os.PathLike, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], float]:
    """A LoRA file in any of the three namings → (tensors in our naming, factor), so that
    `merge_lora(model, sd, factor * strength)` applies it as its own loader would.

    Every tensor must be a LoRA weight of a linear of `cfg` with a fitting shape; ValueError
    naming the file and the key otherwise. When layers carry different alpha/rank (a ComfyUI
    file may), each layer's ratio is folded into its B and the factor is 1.
    """
    path, tensors, meta = _open(path)
    fmt = detect_lora_format(tensors)
    prefix, pattern = _prefix(fmt), _PARTS[fmt]
    linears = _model_linears(cfg)
    ours_of = {_module_name(m, fmt): m for m in linears}

    layers: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # our module → part → (file key, tensor)
    for key, value in tensors.items():
        m = pattern.fullmatch(key.removeprefix(prefix)) if key.startswith(prefix) else None
        module = ours_of.get(prefix + m.group("module")) if m else None
        if module is None:
            raise ValueError(f"LoRA file {path} ({fmt} naming): {key!r} is not a LoRA weight of a linear of model "
                             f"config {cfg.name!r}" + _hint(key, fmt))
        part = "alpha" if m.groupdict().get("alpha") else _PART_OF[m.group("part")]
        if part in layers.setdefault(module, {}):
            raise ValueError(f"LoRA file {path}: {key!r} and {layers[module][part][0]!r} are the same weight")
        layers[module][part] = (key, value)

    sd, ratios = {}, {}
    for module, parts in layers.items():
        name = _module_name(module, fmt)
        if "A" not in parts or "B" not in parts:
            have, missing = ("A", "B") if "A" in parts else ("B", "A")
            if have not in parts:
                raise ValueError(f"LoRA file {path}: {parts['alpha'][0]!r} has no LoRA weights beside it")
            raise ValueError(f"LoRA file {path}: {parts[have][0]!r} has no {_part_name(missing, fmt)} weight "
                             f"({name}{_suffix(missing, fmt)} is missing)")
        (key_a, A), (key_b, B) = parts["A"], parts["B"]
        out_f, in_f = linears[module]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[1] != in_f or B.shape[0] != out_f:
            raise ValueError(f"LoRA file {path}: {key_a!r} {tuple(A.shape)} and {key_b!r} {tuple(B.shape)} do not fit "
                             f"the model's linear {name} of weight {(out_f, in_f)} (model config {cfg.name!r}; "
                             f"needs A: rank×{in_f}, B: {out_f}×rank)")
        if "alpha" in parts:
            alpha_key, alpha = parts["alpha"]
            if alpha.numel() != 1:
                raise ValueError(f"LoRA file {path}: {alpha_key!r} must be a scalar, has shape {tuple(alpha.shape)}")
            ratios[module] = float(alpha.item()) / A.shape[0]
        else:
            ratios[module] = 1.0  # kohya / ComfyUI: no alpha means scale 1
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = A, B

    ratio = _file_ratio(path, fmt, meta, {int(sd[f"{m}.lora_A.weight"].shape[0]) for m in layers})
    if ratio is not None:
        return sd, ratio
    if len(set(ratios.values())) == 1:
        return sd, next(iter(ratios.values()))
    for module, r in ratios.items():  # layers at different alpha/rank: fold each into its B
        B = sd[f"{module}.lora_B.weight"]
        sd[f"{module}.lora_B.weight"] = (B.double() * r).to(B.dtype)
    return sd, 1.0


def _part_name(part: str, fmt: str) -> str:
    return {"A": "lora_down (A)", "B": "lora_up (B)"}[part] if fmt == "comfyui" else f"lora_{part}"


def _suffix(part: str, fmt: str) -> str:
    if fmt == "comfyui":
        return {"A": ".lora_down.weight", "B": ".lora_up.weight"}[part]
    return f".lora_{part}.weight"


def _hint(key: str, fmt: str) -> str:
    if fmt == "k2train" and key.startswith("model.diffusion_model."):
        return " (ComfyUI LoRA names start with 'diffusion_model.', without 'model.')"
    if fmt == "k2train" and key.startswith("base_model.model."):
        return " (peft's 'base_model.model.' prefix: strip it to get k2train names)"
    return ""


def parse_lora(spec: str, default_scale: float = 1.0) -> tuple[str, float]:
    """A `--lora PATH[:SCALE]` argument -> (PATH, SCALE). What follows the last ':' is the
    scale only when it reads as a number, so a path may hold colons."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, default_scale
