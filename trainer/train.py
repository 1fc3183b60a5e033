"""Entry point: `python -m trainer.train experiment=demo stage.steps=500 ...`.

Hydra composes configs/train.yaml with the overrides, validated against the
dataclass schemas in trainer/config.py; the resolved config is written to the
run directory, then the loop starts (resuming if the run has checkpoints).
"""

import difflib
import os
import sys
import traceback
from dataclasses import is_dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import TrainConfig

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that the dataclass schema lacks, with a guess at the one meant.

    Hydra's struct mode refuses `stage.stpes=5`, but the `+stage.stpes=5` its error suggests
    is an explicit add: Hydra applies it with OmegaConf.update(force_add=True), which lifts
    struct mode for that key, and OmegaConf.to_object then sets the stray key as a plain
    attribute on the dataclass, where nothing reads it. So the keys are compared here.
    Below a field typed as a dict (not a dataclass), any key is the field's own."""
    out = []
    for key, value in cfg.items_ex(resolve=False):
        if not prefix and key == "hydra":
            continue
        path = f"{prefix}{key}"
        if key not in schema.keys():
            guess = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            out.append(path + (f" (did you mean {prefix}{guess[0]}?)" if guess else ""))
            continue
        ref = schema[key]
        if isinstance(value, DictConfig) and isinstance(ref, DictConfig) and is_dataclass(OmegaConf.get_type(ref)):
            out += unknown_keys(value, ref, path + ".")
    return out


def to_config(cfg: DictConfig) -> TrainConfig:
    """Typed config from a composed DictConfig (types already checked by Hydra, keys here)."""
    unknown = unknown_keys(cfg, OmegaConf.structured(TrainConfig))
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)}: not in the schema (trainer/config.py), "
                         "so nothing would read it")
    missing = set(OmegaConf.missing_keys(cfg))
    for key in cfg.stage.get("requires") or []:
        if OmegaConf.select(cfg, key, throw_on_missing=False) is None and not OmegaConf.is_missing(cfg, key):
            missing.add(key)
    if missing:
        missing = sorted(missing)
        raise ValueError(f"{', '.join(missing)} must be set: stage {cfg.stage.name!r} cannot run without "
                         f"{'them' if len(missing) > 1 else 'it'} (e.g. {missing[0]}=...)")
    return OmegaConf.to_object(cfg)


def save_resolved(cfg: DictConfig, run_dir: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, "config.yaml.tmp")
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, os.path.join(run_dir, "config.yaml"))


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    from trainer.loop import NonFiniteError, train

    # Everything is checked before the run directory (or anything else) is made.
    try:
        config = to_config(cfg)
        config.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, OmegaConfBaseException) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        save_resolved(cfg, config.run_dir)
    try:
        train(config)
    except NonFiniteError as e:
        print(f"training failed: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        # Bad input found once work started (a shard set, a checkpoint to start from): the
        # message names the file; the traceback goes to train.log for whoever debugs it.
        log_path = os.path.join(config.run_dir, "train.log")
        if os.path.exists(log_path):
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
        print(f"input error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
