"""Bad configuration is rejected before any work starts, naming the key."""

import os
import subprocess
import sys

from tests.conftest import ROOT, train_cmd, train_env


def _fails(*overrides, extra_args=()):
    proc = subprocess.run(
        [*train_cmd(*overrides), *extra_args], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0, proc.stdout
    return proc.stdout + proc.stderr


def test_unknown_key_on_command_line_is_named(run_root):
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "model.num_blokcs=3")
    assert "num_blokcs" in out
    assert not os.path.exists(run_root)  # nothing started


def test_mistyped_value_is_named(run_root):
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "stage.steps=ten")
    assert "stage.steps" in out
    assert not os.path.exists(run_root)


def test_unknown_key_in_a_yaml_file_is_named(tmp_path, run_root):
    exp = tmp_path / "conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "typo.yaml").write_text("# @package _global_\nstage:\n  stpes: 10\n")
    out = _fails("experiment=typo", f"run_root={run_root}", extra_args=["--config-dir", str(tmp_path / "conf")])
    assert "stpes" in out
    assert not os.path.exists(run_root)


def test_inconsistent_values_are_rejected_with_the_key(run_root):
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "stage.global_batch_size=6")
    assert "stage.global_batch_size" in out
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "model.rope_axes=[8,8,8]")
    assert "model.rope_axes" in out


def test_run_directory_defaults_to_the_slurm_job_id(run_root):
    env = {**train_env(), "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(train_cmd(f"run_root={run_root}", "model=tiny", "device=cpu", "stage.steps=1",
                                    "stage.global_batch_size=2", "stage.micro_batch_size=2", "log.tensorboard=false"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(run_root, "4242", "config.yaml"))
    assert os.path.exists(os.path.join(run_root, "4242", "checkpoints", "step_00000001"))


def test_every_shipped_experiment_and_model_composes_and_validates():
    import glob

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trainer.train  # noqa: F401  (registers the schema)

    configs = os.path.join(ROOT, "configs")
    experiments = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(configs, "experiment", "*.yaml")))
    models = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(configs, "model", "*.yaml")))
    assert {"demo", "demo_lora", "res_256", "res_512", "res_1024"} <= set(experiments)
    required = ["data.path=/shards", "checkpoint.init_from=/runs/prev"]
    for name in experiments:
        with initialize_config_dir(config_dir=configs, version_base=None):
            cfg = compose("train", overrides=[f"experiment={name}"] + (required if name.startswith("res_") else []))
        OmegaConf.to_object(cfg).validate(world_size=1 if name in ("demo", "demo_lora", "test_tiny") else 8)
    for name in models:
        with initialize_config_dir(config_dir=configs, version_base=None):
            OmegaConf.to_object(compose("train", overrides=[f"model={name}"])).model.validate()


def test_stage_settings_are_checked_with_the_config(run_root):
    """Stage settings fail before any work starts — in the trainer and in `slurm.submit --dry-run`."""
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "stage=pretrain_256_repa", "stage.repa.block=99")
    assert "stage.repa.block=99" in out
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "stage.lora.rank=4")
    assert "checkpoint.init_from" in out  # a LoRA needs weights to adapt
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "optimizer.schedule=linear")
    assert "optimizer.schedule" in out
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "stage.kind=nowhere.module:Stage")
    assert "stage.kind" in out
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--dry-run", "+launcher=slurm", "experiment=test_tiny",
         f"run_root={run_root}", "stage.micro_batch_size=1", "stage=pretrain_256_repa", "stage.repa.block=99"],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "stage.repa.block=99" in proc.stdout + proc.stderr
    assert not os.path.exists(os.path.join(run_root, "test_tiny", "train.sbatch"))
