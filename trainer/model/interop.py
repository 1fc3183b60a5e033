"""Weights in and out: diffusers' Krea2Transformer2DModel layout and the official release layout.

Three names for every tensor: ours (K2DiT), diffusers', and the release's
(also what ComfyUI loads, optionally under `model.diffusion_model.`). The
tables below are the whole mapping; the only non-rename is the per-block
modulation table, stored flat (6·D,) in the release and (6, D) elsewhere.

    load_pretrained("ckpt/transformer")             # diffusers folder (config.json, sharded or not)
    load_pretrained("krea2_raw.safetensors")        # release file: sizes inferred from shapes
    save_pretrained(model, "out/transformer")       # Krea2Transformer2DModel.from_pretrained(...) loads it
    save_pretrained(model, "out/k2.safetensors", fmt="release")
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.model.config import ModelConfig
from trainer.model.dit import K2DiT, build_on_meta

DIFFUSERS_CLASS = "Krea2Transformer2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
RELEASE_PREFIX = "model.diffusion_model."
FORMATS = ("diffusers", "release")

# ours → (diffusers, release), for tensors outside the repeated blocks.
_TOP = {
    "img_in.weight": ("img_in.weight", "first.weight"),
    "img_in.bias": ("img_in.bias", "first.bias"),
    "time_mlp.fc1.weight": ("time_embed.linear_1.weight", "tmlp.0.weight"),
    "time_mlp.fc1.bias": ("time_embed.linear_1.bias", "tmlp.0.bias"),
    "time_mlp.fc2.weight": ("time_embed.linear_2.weight", "tmlp.2.weight"),
    "time_mlp.fc2.bias": ("time_embed.linear_2.bias", "tmlp.2.bias"),
    "time_proj.weight": ("time_mod_proj.weight", "tproj.1.weight"),
    "time_proj.bias": ("time_mod_proj.bias", "tproj.1.bias"),
    "text_fusion.collapse.weight": ("text_fusion.projector.weight", "txtfusion.projector.weight"),
    "text_in.norm.weight": ("txt_in.norm.weight", "txtmlp.0.scale"),
    "text_in.fc1.weight": ("txt_in.linear_1.weight", "txtmlp.1.weight"),
    "text_in.fc1.bias": ("txt_in.linear_1.bias", "txtmlp.1.bias"),
    "text_in.fc2.weight": ("txt_in.linear_2.weight", "txtmlp.3.weight"),
    "text_in.fc2.bias": ("txt_in.linear_2.bias", "txtmlp.3.bias"),
    "final.mod": ("final_layer.scale_shift_table", "last.modulation.lin"),
    "final.norm.weight": ("final_layer.norm.weight", "last.norm.scale"),
    "final.linear.weight": ("final_layer.linear.weight", "last.linear.weight"),
    "final.linear.bias": ("final_layer.linear.bias", "last.linear.bias"),
}
# Block lists: ours → (diffusers, release).
_CONTAINERS = {
    "blocks": ("transformer_blocks", "blocks"),
    "text_fusion.layerwise": ("text_fusion.layerwise_blocks", "txtfusion.layerwise_blocks"),
    "text_fusion.refiner": ("text_fusion.refiner_blocks", "txtfusion.refiner_blocks"),
}
# Inside one block (main or text fusion): ours → (diffusers, release).
_LEAVES = {
    "mod": ("scale_shift_table", "mod.lin"),  # main blocks only
    "norm1.weight": ("norm1.weight", "prenorm.scale"),
    "norm2.weight": ("norm2.weight", "postnorm.scale"),
    "attn.q.weight": ("attn.to_q.weight", "attn.wq.weight"),
    "attn.k.weight": ("attn.to_k.weight", "attn.wk.weight"),
    "attn.v.weight": ("attn.to_v.weight", "attn.wv.weight"),
    "attn.gate.weight": ("attn.to_gate.weight", "attn.gate.weight"),
    "attn.out.weight": ("attn.to_out.0.weight", "attn.wo.weight"),
    "attn.q_norm.weight": ("attn.norm_q.weight", "attn.qknorm.qnorm.scale"),
    "attn.k_norm.weight": ("attn.norm_k.weight", "attn.qknorm.knorm.scale"),
    "mlp.w_gate.weight": ("ff.gate.weight", "mlp.gate.weight"),
    "mlp.w_up.weight": ("ff.up.weight", "mlp.up.weight"),
    "mlp.w_down.weight": ("ff.down.weight", "mlp.down.weight"),
}
# K2DiT.aux: training-only modules, never exported.
AUX_PREFIX = "aux."
# Wrappers that the trainer puts around blocks (torch.compile, activation checkpointing),
# and peft's adapter name inside LoRA weights: never part of a saved name.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.")
_ADAPTER_SEGMENTS = ((".lora_A.default.", ".lora_A."), (".lora_B.default.", ".lora_B."))


def clean_name(key: str) -> str:
    """A parameter's own name, whatever wraps its module: `blocks.0._orig_mod._checkpoint_wrapped_module.attn.q.weight`
    → `blocks.0.attn.q.weight`; peft's `….lora_A.default.weight` → `….lora_A.weight`."""
    for seg in _WRAPPER_SEGMENTS:
        key = key.replace(seg, "")
    for seg, plain in _ADAPTER_SEGMENTS:
        key = key.replace(seg, plain)
    return key


def _check_fmt(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    return FORMATS.index(fmt)


def foreign_name(key: str, fmt: str) -> str:
    """Name of our parameter `key` in layout `fmt`."""
    i = _check_fmt(fmt)
    key = clean_name(key)
    if key in _TOP:
        return _TOP[key][i]
    for ours, theirs in _CONTAINERS.items():
        if key.startswith(ours + "."):
            index, leaf = key[len(ours) + 1 :].split(".", 1)
            if leaf in _LEAVES and index.isdigit():
                return f"{theirs[i]}.{index}.{_LEAVES[leaf][i]}"
    raise ValueError(f"parameter {key!r} has no {fmt} name")


def _is_block_table(key: str) -> bool:
    return key.startswith("blocks.") and key.endswith(".mod")


# ---------------------------------------------------------------- state dicts


def to_foreign_state_dict(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict → `fmt` layout (tensors shared, not copied, except reshapes).

    `aux.*` (training-only extras such as the iREPA projector) has no place in either
    inference layout and is left out.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith(AUX_PREFIX):
            continue
        name = foreign_name(key, fmt)
        if fmt == "release" and name.endswith(".mod.lin") and name.startswith("blocks."):
            value = value.reshape(-1)
        out[name] = value
    return out


def from_foreign_state_dict(sd: dict[str, torch.Tensor], fmt: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`fmt` layout → our state dict for `cfg`; ValueError naming missing/unexpected keys and bad shapes."""
    _check_fmt(fmt)
    if fmt == "release":
        sd = {k.removeprefix(RELEASE_PREFIX): v for k, v in sd.items()}
    expected = {k: tuple(v.shape) for k, v in build_on_meta(cfg).state_dict().items()}
    ours_of = {foreign_name(k, fmt): k for k in expected}

    missing = sorted(name for name in ours_of if name not in sd)
    unexpected = sorted(name for name in sd if name not in ours_of)
    out, bad_shapes = {}, []
    for name, value in sd.items():
        if name not in ours_of:
            continue
        key = ours_of[name]
        if _is_block_table(key) and fmt == "release" and value.ndim == 1 and value.numel() == 6 * cfg.dim:
            value = value.reshape(6, cfg.dim)
        if tuple(value.shape) != expected[key]:
            bad_shapes.append(f"{name}: checkpoint {tuple(value.shape)} vs model {expected[key]}")
        out[key] = value
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"{fmt} state dict does not match model config {cfg.name!r}:"
            + _listing("missing keys", missing)
            + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches", bad_shapes)
        )
    return out


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


StateDict = dict[str, torch.Tensor]


def to_diffusers_state_dict(sd: StateDict) -> StateDict:
    return to_foreign_state_dict(sd, "diffusers")


def from_diffusers_state_dict(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return from_foreign_state_dict(sd, "diffusers", cfg)


def to_release_state_dict(sd: StateDict) -> StateDict:
    return to_foreign_state_dict(sd, "release")


def from_release_state_dict(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Accepts keys with or without ComfyUI's `model.diffusion_model.` prefix."""
    return from_foreign_state_dict(sd, "release", cfg)


def detect_format(keys) -> str:
    """"diffusers" or "release", from the tensor names."""
    keys = {k.removeprefix(RELEASE_PREFIX) for k in keys}
    if "img_in.weight" in keys and "time_embed.linear_1.weight" in keys:
        return "diffusers"
    if "first.weight" in keys:
        return "release"
    raise ValueError("weights are neither diffusers' Krea2Transformer2DModel nor the Krea 2 release layout")


# ---------------------------------------------------------------- configs


def config_to_diffusers(cfg: ModelConfig) -> dict:
    """`Krea2Transformer2DModel(**config_to_diffusers(cfg))` builds the same network."""
    return {
        "in_channels": cfg.in_channels,
        "num_layers": cfg.num_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.mlp_hidden,
        "timestep_embed_dim": cfg.timestep_dim,
        "text_hidden_dim": cfg.text_dim,
        "num_text_layers": cfg.num_text_layers,
        "text_num_attention_heads": cfg.text_num_heads,
        "text_num_key_value_heads": cfg.text_num_kv_heads,
        "text_intermediate_size": cfg.text_mlp_hidden,
        "num_layerwise_text_blocks": cfg.num_layerwise_blocks,
        "num_refiner_text_blocks": cfg.num_refiner_blocks,
        "axes_dims_rope": list(cfg.rope_axes),
        "rope_theta": float(cfg.rope_theta),
        "norm_eps": float(cfg.norm_eps),
    }


def config_from_diffusers(d: dict, patch_size: int = 2, name: str = "pretrained") -> ModelConfig:
    """Inverse of `config_to_diffusers`. diffusers stores only the packed channel count, so the
    patch size (2 for the Qwen-Image VAE release) is an argument."""
    defaults = config_to_diffusers(ModelConfig())  # diffusers' defaults are the release's, as are ours
    d = {**defaults, **{k: v for k, v in d.items() if not k.startswith("_")}}
    if d["in_channels"] % (patch_size * patch_size):
        raise ValueError(f"in_channels={d['in_channels']} is not divisible by patch_size²={patch_size**2}")
    cfg = ModelConfig(
        name=name,
        latent_channels=d["in_channels"] // (patch_size * patch_size),
        patch_size=patch_size,
        dim=d["attention_head_dim"] * d["num_attention_heads"],
        num_blocks=d["num_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d["num_key_value_heads"],
        mlp_hidden=d["intermediate_size"],
        timestep_dim=d["timestep_embed_dim"],
        text_dim=d["text_hidden_dim"],
        num_text_layers=d["num_text_layers"],
        text_num_heads=d["text_num_attention_heads"],
        text_num_kv_heads=d["text_num_key_value_heads"],
        text_mlp_hidden=d["text_intermediate_size"],
        num_layerwise_blocks=d["num_layerwise_text_blocks"],
        num_refiner_blocks=d["num_refiner_text_blocks"],
        rope_axes=list(d["axes_dims_rope"]),
        rope_theta=float(d["rope_theta"]),
        norm_eps=float(d["norm_eps"]),
    )
    cfg.validate()
    return cfg


def infer_config(sd: dict[str, torch.Tensor], fmt: str, patch_size: int = 2, name: str = "pretrained") -> ModelConfig:
    """Model sizes from tensor shapes alone (for a release file, which has no config).

    Not recoverable from shapes: the patch size (argument), RoPE split and
    theta, norm eps. Those get the release's rules: rope axes
    (hd − 12·⌊hd/16⌋, 6·⌊hd/16⌋, 6·⌊hd/16⌋), i.e. (32, 48, 48) at head_dim 128.
    """
    if fmt == "release":
        sd = {k.removeprefix(RELEASE_PREFIX): v for k, v in sd.items()}

    def shape(key: str) -> tuple[int, ...]:
        name_ = foreign_name(key, fmt)
        if name_ not in sd:
            raise ValueError(f"cannot infer model config: {fmt} weights lack {name_!r}")
        return tuple(sd[name_].shape)

    def count(container: str) -> int:
        prefix = _CONTAINERS[container][_check_fmt(fmt)] + "."
        indices = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
        return max(indices) + 1 if indices else 0

    dim, in_channels = shape("img_in.weight")
    head_dim = shape("blocks.0.attn.q_norm.weight")[0]
    text_dim = shape("text_in.norm.weight")[0]
    text_head_dim = shape("text_fusion.layerwise.0.attn.q_norm.weight")[0]
    q = head_dim // 16
    if in_channels % (patch_size * patch_size):
        raise ValueError(f"in_channels={in_channels} is not divisible by patch_size²={patch_size**2}")
    cfg = ModelConfig(
        name=name,
        latent_channels=in_channels // (patch_size * patch_size),
        patch_size=patch_size,
        dim=dim,
        num_blocks=count("blocks"),
        num_heads=dim // head_dim,
        num_kv_heads=shape("blocks.0.attn.k.weight")[0] // head_dim,
        mlp_hidden=shape("blocks.0.mlp.w_gate.weight")[0],
        timestep_dim=shape("time_mlp.fc1.weight")[1],
        text_dim=text_dim,
        num_text_layers=shape("text_fusion.collapse.weight")[1],
        text_num_heads=text_dim // text_head_dim,
        text_num_kv_heads=shape("text_fusion.layerwise.0.attn.k.weight")[0] // text_head_dim,
        text_mlp_hidden=shape("text_fusion.layerwise.0.mlp.w_gate.weight")[0],
        num_layerwise_blocks=count("text_fusion.layerwise"),
        num_refiner_blocks=count("text_fusion.refiner"),
        rope_axes=[head_dim - 12 * q, 6 * q, 6 * q],
    )
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- files


def _read_safetensors(files: list[Path], device: str) -> dict[str, torch.Tensor]:
    sd = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=device) as fh:
            for key in fh.keys():
                sd[key] = fh.get_tensor(key)
    return sd


def _diffusers_weight_files(folder: Path) -> list[Path]:
    index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    if (folder / DIFFUSERS_WEIGHTS).exists():
        return [folder / DIFFUSERS_WEIGHTS]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {folder}")
    return files


def load_pretrained(
    path: str | os.PathLike,
    cfg: ModelConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    patch_size: int | None = None,
) -> K2DiT:
    """K2DiT from a diffusers folder (config.json + safetensors, sharded or not) or a
    single release .safetensors file (or a folder holding one, without config.json).

    `cfg` is optional: a diffusers folder carries its config, a release file's
    sizes are inferred from shapes. If given, it must agree with the weights;
    its patch size (otherwise `patch_size`, default 2) splits the packed channels.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    p = patch_size or (cfg.patch_size if cfg is not None else 2)
    if path.is_dir() and (path / "config.json").exists():
        json_cfg = config_from_diffusers(json.loads((path / "config.json").read_text()), patch_size=p, name=path.name)
        if cfg is not None and config_to_diffusers(cfg) != config_to_diffusers(json_cfg):
            a, b = config_to_diffusers(cfg), config_to_diffusers(json_cfg)
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            raise ValueError(f"given model config disagrees with {path / 'config.json'} (given, file): {diff}")
        cfg = cfg or json_cfg
        foreign = _read_safetensors(_diffusers_weight_files(path), str(device))
        fmt = "diffusers"
    else:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if len(files) != 1 or files[0].suffix != ".safetensors":
            raise ValueError(f"{path}: expected a diffusers folder with config.json or one .safetensors file")
        foreign = _read_safetensors(files, str(device))
        fmt = detect_format(foreign.keys())
        if cfg is None:
            cfg = infer_config(foreign, fmt, patch_size=p, name=files[0].stem)

    sd = from_foreign_state_dict(foreign, fmt, cfg)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model = build_on_meta(cfg)
    # assign=True adopts the loaded tensors: no second full-size copy is ever allocated.
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _full_state_dict(model: K2DiT) -> dict[str, torch.Tensor]:
    """Plain CPU tensors; sharded (DTensor) parameters are gathered, so call it on every rank."""
    sd = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        sd[key] = value.detach()
    return sd


def save_pretrained(
    model: K2DiT,
    path: str | os.PathLike,
    fmt: str = "diffusers",
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 10 * 2**30,
) -> Path:
    """Writes `model` as a diffusers folder (config.json + safetensors, sharded past
    `max_shard_bytes` with diffusers' index file) or as one release .safetensors file
    (`path` may be that file or a folder to put model.safetensors in). Returns what was written."""
    _check_fmt(fmt)
    sd = to_foreign_state_dict(_full_state_dict(model), fmt)
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in sd.items()}
    path = Path(path)
    meta = {"format": "pt"}
    if fmt == "release":
        target = path if path.suffix == ".safetensors" else path / "model.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(target), metadata=meta)
        return target

    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": _diffusers_version(), **config_to_diffusers(model.cfg)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards, current, size = [], {}, 0
    for key in sorted(sd):
        nbytes = sd[key].numel() * sd[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = sd[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / DIFFUSERS_WEIGHTS), metadata=meta)
        return path
    stem = DIFFUSERS_WEIGHTS.removesuffix(".safetensors")
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / f"{DIFFUSERS_WEIGHTS}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.42.1"
