"""Entry point: `python -m trainer.train experiment=demo stage.steps=500 ...`.

Hydra composes configs/train.yaml with the overrides, validated against the
dataclass schemas in trainer/config.py; the resolved config is written to the
run directory, then the loop starts (resuming if the run has checkpoints).
"""

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.config import TrainConfig

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_config(cfg: DictConfig) -> TrainConfig:
    """Typed config from a composed DictConfig (keys and types already checked by Hydra)."""
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

    config = to_config(cfg)
    try:
        config.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        save_resolved(cfg, config.run_dir)
    try:
        train(config)
    except NonFiniteError as e:
        print(f"training failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
