"""Bad configuration is rejected before any work starts, naming the key."""

import copy
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

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
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = to_config(compose("train", overrides=["experiment=test_tiny", "model.rope_axes=[8,8,8]"]))
    with pytest.raises(ValueError, match=re.escape("model.rope_axes")):
        cfg.validate(world_size=1)


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
    assert {"demo", "demo_lora", "demo_grpo", "res_256", "res_512", "res_1024"} <= set(experiments)
    required = ["data.path=/shards", "checkpoint.init_from=/runs/prev"]
    for name in experiments:
        with initialize_config_dir(config_dir=configs, version_base=None):
            cfg = compose("train", overrides=[f"experiment={name}"] + (required if name.startswith("res_") else []))
        OmegaConf.to_object(cfg).validate(world_size=1 if name.startswith("demo") or name == "test_tiny" else 8)
    for name in models:
        with initialize_config_dir(config_dir=configs, version_base=None):
            OmegaConf.to_object(compose("train", overrides=[f"model={name}"])).model.validate()


def test_a_value_the_stage_cannot_run_without_is_named_when_left_unset():
    """stage=midtrain without data.weights once trained unweighted, silently."""
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = compose("train", overrides=["stage=midtrain", "data.path=/shards", "checkpoint.init_from=/runs/prev"])
        with pytest.raises(ValueError, match=r"^data\.weights must be set: stage 'midtrain' cannot run without it \(e\.g\. data\.weights=\.\.\.\)"):
            to_config(cfg)
        cfg = compose("train", overrides=["stage=midtrain", "data.path=/shards"])
        with pytest.raises(ValueError, match=r"^checkpoint\.init_from, data\.weights must be set: stage 'midtrain' cannot run without them"):
            to_config(cfg)
        cfg = compose("train", overrides=["stage=midtrain", "data.path=/shards", "checkpoint.init_from=/runs/prev",
                                          "data.weights=/shards/weights.npz"])
        assert to_config(cfg).data.weights == "/shards/weights.npz"
        with pytest.raises(ValueError, match=r"^checkpoint\.init_from must be set: stage 'pretrain_512'"):
            to_config(compose("train", overrides=["experiment=res_512", "data.path=/shards"]))


def test_stage_settings_are_checked_with_the_config(run_root):
    """Stage settings fail before any work starts — in the trainer and in `slurm.submit --dry-run`."""
    out = _fails("experiment=test_tiny", f"run_root={run_root}", "stage=pretrain_256_repa", "stage.repa.block=99")
    assert "stage.repa.block=99" in out
    # The same check the trainer runs before anything else (its main: to_config, validate), in-process.
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config

    for override, named in (("stage.lora.rank=4", "checkpoint.init_from"),  # a LoRA needs weights to adapt
                            ("optimizer.schedule=linear", "optimizer.schedule"),
                            ("stage.kind=nowhere.module:Stage", "stage.kind")):
        with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
            cfg = to_config(compose("train", overrides=["experiment=test_tiny", f"run_root={run_root}", override]))
        with pytest.raises(ValueError, match=re.escape(named)):
            cfg.validate(world_size=1)
    assert not os.path.exists(run_root)
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--dry-run", "+launcher=slurm", "experiment=test_tiny",
         f"run_root={run_root}", "stage.micro_batch_size=1", "stage=pretrain_256_repa", "stage.repa.block=99"],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "stage.repa.block=99" in proc.stdout + proc.stderr
    assert not os.path.exists(os.path.join(run_root, "test_tiny", "train.sbatch"))


# ---- every value with a range is checked before a run directory is made ----------------------
BAD_VALUES = [
    ("+stage.stpes=5", "unknown key stage.stpes (did you mean stage.steps?)"),  # `+` cannot add a field
    ("stage.global_batch_size=0", "stage.global_batch_size must be > 0"),  # trained nothing, logged NaN
    ("stage.micro_batch_size=0", "stage.micro_batch_size must be > 0"),  # ZeroDivisionError
    ("log.every=0", "log.every must be > 0"),  # ZeroDivisionError after a step
    ("optimizer.lr=-1e-3", "optimizer.lr must be > 0"),
    ("optimizer.betas=[0.9]", "optimizer.betas must be two numbers"),  # IndexError inside torch
    ("device=tpu", "device must be auto|cpu|cuda"),  # ran on the CPU
    ("parallel.float8=true", "parallel.float8=true needs device=cuda"),  # torchao float8 GEMMs are CUDA-only
]
BASE = ["model=tiny", "device=cpu", "name=bad", "stage.steps=2", "stage.global_batch_size=2",
        "stage.micro_batch_size=2", "log.tensorboard=false"]


@pytest.mark.parametrize("override,named", [BAD_VALUES[0], BAD_VALUES[2]])
def test_bad_value_exits_2_naming_the_key_before_the_run_directory(run_root, override, named):
    proc = subprocess.run(train_cmd(*BASE, f"run_root={run_root}", override),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert named in proc.stderr
    assert not os.path.exists(run_root)  # not even Hydra's run directory


@pytest.mark.parametrize("override,named", BAD_VALUES)
def test_bad_value_is_named_by_what_the_trainer_checks_first(run_root, override, named):
    """What the trainer's main runs before anything else (to_config, validate), in-process:
    the same message for every value the CLI test above would exit 2 on."""
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config

    with pytest.raises(ValueError, match=re.escape(named)):
        with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
            to_config(compose("train", overrides=[*BASE, f"run_root={run_root}", override])).validate(world_size=1)


def test_slurm_dry_run_refuses_unknown_keys_too(run_root, capsys):
    from slurm.submit import main

    rc = main(["--dry-run", "+launcher=slurm", "experiment=test_tiny", f"run_root={run_root}",
               "stage.micro_batch_size=1", "+stage.stpes=5"])
    assert rc == 2
    assert "unknown key stage.stpes" in capsys.readouterr().err
    assert not os.path.exists(run_root)


@pytest.fixture(scope="module")
def tiny():
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config

    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        return to_config(compose("train", overrides=["experiment=test_tiny"]))


@pytest.mark.parametrize("key,value", [
    ("name", ""), ("device", "tpu"),
    ("stage.steps", 0), ("stage.ema_decay", 1.0), ("stage.max_nonfinite_steps", -1), ("stage.flow.logit_std", 0.0),
    ("stage.lora.rank", -1), ("stage.lora.dropout", 1.0), ("stage.lora.alpha", 0.0),
    ("stage.validation.every", -1), ("stage.validation.samples", 0), ("stage.validation.batch_size", 0),
    ("optimizer.name", "sgd"), ("optimizer.eps", 0.0), ("optimizer.weight_decay", -0.1), ("optimizer.grad_clip", -1.0),
    ("optimizer.warmup_steps", -1), ("optimizer.schedule", "linear"), ("optimizer.min_lr_ratio", 1.5),
    ("optimizer.decay_fraction", 0.0), ("optimizer.betas", [0.9, 1.0]),
    ("parallel.dp_replicate", 0), ("parallel.dp_shard", 3), ("parallel.backend", "mpi"),
    ("parallel.param_dtype", "float16"), ("parallel.activation_checkpoint", "some"),
    ("checkpoint.every", 0), ("checkpoint.keep", 0), ("checkpoint.init_weights", "live"),
    ("checkpoint.preempt_signals", ["SIGNOPE"]),
    ("log.sample_every", -1), ("log.sample_steps", 0), ("log.num_samples", 0), ("log.peak_tflops", 0.0),
    ("log.wandb_mode", "on"),
    ("launcher.nodes", 0), ("launcher.gpus_per_node", -1), ("launcher.max_failures", -1), ("launcher.rdzv_port", 70000),
    ("data.name", "imagenet"), ("data.num_workers", -1), ("data.prefetch", 0), ("data.image_size", 16),
    ("data.caption_dropout", 1.5), ("data.text_len", 0), ("data.text_layers", []), ("data.text_layers", [-1]),
    ("data.latents", "sdxl"), ("data.vae_path", None), ("data.pixel_downsample", 0), ("data.world", "mnist"),
    ("data.synthetic_valid_text", 0.0),
])
def test_out_of_range_value_is_named(tiny, key, value):
    cfg = copy.deepcopy(tiny)
    if key == "data.vae_path":  # a VAE latent space needs its weights
        cfg.data.latents = "qwen_image"
    *parents, leaf = key.split(".")
    setattr(functools.reduce(getattr, parents, cfg), leaf, value)
    with pytest.raises(ValueError, match=re.escape(key)):
        cfg.validate(world_size=1)


def test_the_tiny_config_itself_validates(tiny):
    tiny.validate(world_size=1)  # so each case above fails on its own key alone
    assert tiny.accumulation(1) == 2  # global 8 = micro 4 x 2 accumulation steps
    two = copy.deepcopy(tiny)
    two.validate(world_size=2)
    assert two.accumulation(2) == 1  # micro batch 4 x 2 ranks = global 8


def test_unknown_keys_are_found_at_any_depth_but_a_dict_field_takes_any_key():
    from omegaconf import OmegaConf

    from trainer.train import unknown_keys

    @dataclass
    class Inner:
        rank: int = 0

    @dataclass
    class Schema:
        inner: Inner = field(default_factory=Inner)
        extra: dict[str, int] = field(default_factory=dict)

    cfg = OmegaConf.structured(Schema)
    for key, value in (("inner.rnak", 1), ("extra.anything", 2), ("top", 3)):  # what `+key=value` does
        OmegaConf.update(cfg, key, value, force_add=True)
    assert unknown_keys(cfg, OmegaConf.structured(Schema)) == ["inner.rnak (did you mean inner.rank?)", "top"]
