"""One way to get a plain K2DiT from wherever weights live.

    load_weights("runs/sft")                          # a k2train run: newest checkpoint, EMA weights
    load_weights("runs/sft/checkpoints/step_00000400", "model")
    load_weights("/models/krea-2-raw")                # diffusers folder or release .safetensors
    load_weights("runs/base", loras=[("pink.safetensors", 0.8)])

A LoRA run's checkpoint holds only its adapters; its `models.json` names the base
(pinned to the exact checkpoint folder it was trained on), which is loaded first
and the adapters merged onto it. LoRA files (`loras`) in our, diffusers' or
ComfyUI's key naming are merged last, each at its own strength.
"""

import os
from dataclasses import asdict

import torch

from trainer.checkpoint import read_models, read_tensors, resolve_checkpoint, verify_checkpoint
from trainer.lora import is_adapter, merge_lora
from trainer.model import K2DiT, ModelConfig, load_pretrained


def same_network(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs describe the same tensors (the name does not matter)."""
    return {**asdict(a), "name": ""} == {**asdict(b), "name": ""}


def checkpoint_model_config(step_dir: str, name: str = "model") -> ModelConfig:
    """The model config a checkpoint was written with: models.json, or the run's config.yaml."""
    info = read_models(step_dir).get(name)
    if info is not None:
        return ModelConfig(**info["config"])
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), "config.yaml")
    if not os.path.exists(run_config):
        raise ValueError(f"{step_dir}: no models.json and no run config.yaml beside its checkpoints/ folder")
    from omegaconf import OmegaConf

    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(run_config).model, resolve=True))


def load_weights(source: str, which: str = "ema", loras: list[tuple[str, float]] | tuple = (),
                 model_cfg: ModelConfig | None = None, name: str = "model") -> K2DiT:
    """A plain (unsharded, CPU, float32) K2DiT with the weights of `source`.

    source: a k2train run dir, its checkpoints/ dir or one step dir; or released weights
    (a diffusers folder or a release .safetensors file). which: "ema" or "model" (live)
    weights of a k2train checkpoint. model_cfg: when given, the weights must fit it.
    """
    if not os.path.exists(source):
        raise ValueError(f"{source} does not exist (expected a k2train run or checkpoint, a diffusers folder or a "
                         f"release .safetensors file)")
    step_dir = resolve_checkpoint(source)
    if step_dir is None:
        model = load_pretrained(source, model_cfg)
    else:
        verify_checkpoint(step_dir)
        cfg = checkpoint_model_config(step_dir, name)
        if model_cfg is not None and not same_network(cfg, model_cfg):
            raise ValueError(f"{step_dir} holds model config {cfg.name!r}, which is not the network of "
                             f"{model_cfg.name!r}: {_diff(cfg, model_cfg)}")
        info = read_models(step_dir).get(name, {})
        if info.get("lora"):
            model = _load_lora_run(step_dir, info, which, cfg)
        else:
            from trainer.checkpoint import load_model_weights

            model = K2DiT(cfg)
            load_model_weights(model, step_dir, which)
    for path, scale in loras:
        from trainer.lora_io import read_lora

        sd, factor = read_lora(path, model.cfg)
        merge_lora(model, sd, factor * scale)
    return model


def _load_lora_run(step_dir: str, info: dict, which: str, cfg: ModelConfig) -> K2DiT:
    base = info.get("base") or {}
    if not base.get("source"):
        raise ValueError(f"{step_dir}: a LoRA checkpoint whose models.json names no base")
    model = load_weights(base["source"], base.get("weights", "ema"), model_cfg=cfg)
    adapters = lora_adapters(step_dir, which)
    merge_lora(model, adapters, info["lora"]["alpha"] / info["lora"]["rank"])
    return model


def lora_adapters(step_dir: str, which: str = "ema") -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA checkpoint ("ema" falls back to the live ones)."""
    sd = {k: v for k, v in read_tensors(step_dir, "ema").items() if is_adapter(k)} if which == "ema" else {}
    if not sd:
        sd = {k: v for k, v in read_tensors(step_dir, "model").items() if is_adapter(k)}
    if not sd:
        raise ValueError(f"{step_dir} holds no LoRA weights")
    return sd


def _diff(a: ModelConfig, b: ModelConfig) -> dict:
    x, y = asdict(a), asdict(b)
    return {k: (x[k], y[k]) for k in x if k != "name" and x[k] != y[k]}
