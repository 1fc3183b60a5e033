"""Small questions the batch scripts ask of a config or a run directory.

    python -m slurm.resolve run_dir [overrides...]   # the run directory these overrides train into
    python -m slurm.resolve state RUN_DIR            # how the last attempt ended (status.json)
"""

import os
import sys

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def compose_config(overrides: list[str]):
    """The composed, schema-checked config (a DictConfig), as trainer.train would see it."""
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("train", overrides=overrides)


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "run_dir":
        cfg = compose_config(argv[1:])
        print(os.path.join(cfg.run_root, cfg.name))
        return 0
    if len(argv) == 2 and argv[0] == "state":
        from trainer.preemption import read_status

        print(read_status(argv[1]).get("state", "missing"))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
