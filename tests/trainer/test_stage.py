"""The Stage API in the configuration users run: several models, AC + compile, LoRA."""

import os
import subprocess

import pytest
import torch
import yaml

from tests.conftest import ROOT, assert_bitwise_equal, final_state, run_training, train_cmd, train_env
from tests.trainer.test_interop import inputs as interop_inputs
from tests.trainer.test_resume import kill_when
from trainer.checkpoint import list_checkpoints, read_models, read_tensors
from trainer.config import OptimizerConfig, ParallelConfig
from trainer.model import K2DiT, ModelConfig, clean_name
from trainer.optim import build_optimizer
from trainer.parallel import Dist, parallelize

TINY = ModelConfig(**yaml.safe_load(open(os.path.join(ROOT, "configs/model/tiny.yaml"))))
SINGLE = Dist(0, 1, 0, torch.device("cpu"), None)
AC_COMPILE = ["parallel.activation_checkpoint=full", "parallel.compile=true"]
TWO_MODELS = "stage.kind=tests.trainer.stages:TwoModelStage"


def decayed_names(parallel: ParallelConfig) -> set[str]:
    model = parallelize(K2DiT(TINY), parallel, SINGLE)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    return {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}


def test_decayed_parameters_are_the_same_with_ac_and_compile():
    plain = decayed_names(ParallelConfig())
    # The tiny model has 59 matrices; only the three modulation tables (blocks.{0,1}.mod, final.mod) skip decay.
    assert len(plain) == 56
    assert not any(n.endswith(".mod") for n in plain)
    for ac, comp in (("full", False), ("none", True), ("full", True)):
        assert decayed_names(ParallelConfig(activation_checkpoint=ac, compile=comp)) == plain, (ac, comp)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A short pretraining run with activation checkpointing and compile on (as on GPUs)."""
    root = str(tmp_path_factory.mktemp("base"))
    run_training("experiment=test_tiny", f"run_root={root}", "name=base", "stage.steps=3", *AC_COMPILE)
    return os.path.join(root, "base")


def test_ac_compile_run_saves_clean_names_and_loads_into_the_next_stage(base_run, tmp_path):
    step_dir = os.path.join(base_run, "checkpoints", "step_00000003")
    own = {n for n, _ in K2DiT(TINY).named_parameters()}
    assert set(read_tensors(step_dir, "ema")) == own  # not blocks.0._checkpoint_wrapped_module...
    assert set(read_tensors(step_dir, "model")) == own
    # init_from (EMA by default) takes them as they are
    from trainer.config import TrainConfig
    from trainer.loop import setup

    cfg = TrainConfig(name="next", run_root=str(tmp_path), device="cpu", model=TINY)
    cfg.stage.global_batch_size = cfg.stage.micro_batch_size = 2
    cfg.checkpoint.init_from = base_run
    cfg.log.tensorboard = False
    got = setup(cfg).stage.trainables["model"].module.state_dict()
    ema = read_tensors(step_dir, "ema")
    assert all(torch.equal(got[n], ema[n]) for n in own)
    # and trainer.evaluate scores it
    from trainer.evaluate import evaluate

    report = evaluate(base_run, seeds=1, steps=2)
    assert report["step"] == 3


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
    """LoRA SFT from the base run, in the GPU configuration (AC + compile)."""
    root = str(tmp_path_factory.mktemp("lora"))
    run_training("experiment=test_tiny", f"run_root={root}", "name=lora", "stage=sft", "stage.steps=4",
                 "stage.global_batch_size=8", "stage.micro_batch_size=4", "stage.ema_decay=0.5", "stage.lora.rank=4",
                 "stage.lora.targets=[attn.q,attn.v,mlp.w_up]", "optimizer.lr=3e-2", "optimizer.schedule=constant",
                 "optimizer.warmup_steps=0", f"checkpoint.init_from={base_run}", *AC_COMPILE)
    return os.path.join(root, "lora")


def test_lora_run_checkpoints_only_the_adapter_and_names_its_base(lora_run, base_run):
    step_dir = os.path.join(lora_run, "checkpoints", "step_00000004")
    saved = read_tensors(step_dir, "model")
    assert saved and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved), sorted(saved)[:4]
    assert len(saved) == 2 * 3 * TINY.num_blocks  # A and B of q, v, w_up in each block
    assert set(read_tensors(step_dir, "ema")) == set(saved)
    info = read_models(step_dir)["model"]
    assert info["lora"] == {"rank": 4, "alpha": 4.0, "targets": ["attn.q", "attn.v", "mlp.w_up"], "text_fusion": False}
    assert info["base"] == {"source": os.path.abspath(os.path.join(base_run, "checkpoints", "step_00000003")),
                            "weights": "ema"}
    # the adapters actually trained (B starts at zero)
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)


def test_lora_on_a_checkpoint_computes_what_the_merged_model_computes(lora_run, base_run, tmp_path):
    from trainer.config import TrainConfig
    from trainer.loop import setup
    from trainer.weights import load_weights

    cfg = TrainConfig(**{**OmegaConf_load(lora_run).__dict__, "run_root": os.path.dirname(lora_run)})
    stage = setup(cfg).stage  # resumes the finished run: peft-injected model under AC + compile
    live = stage.trainables["model"].module
    # Its base weights are the base run's EMA, not a random init.
    base_ema = read_tensors(os.path.join(base_run, "checkpoints", "step_00000003"), "ema")
    own = {clean_name(n).replace(".base_layer", ""): p for n, p in live.named_parameters() if ".lora_" not in n}
    assert own.keys() == base_ema.keys()
    assert all(torch.equal(own[n], base_ema[n]) for n in own)
    merged = load_weights(lora_run, "model")  # base + B A at alpha / rank, a plain K2DiT
    inputs = interop_inputs(TINY)
    live.eval()
    with torch.no_grad():
        a, b = live(*inputs), merged(*inputs)
        plain_base = K2DiT(TINY)
        plain_base.load_state_dict(base_ema)
        c = plain_base(*inputs)
    mismatch, effect = (a - b).abs().max(), (a - c).abs().max()
    assert mismatch < 1e-5
    assert effect > 50 * mismatch, (effect, mismatch)  # the adapter's effect is far above the tolerance
    q = "blocks.0.attn.q.weight"
    assert (merged.state_dict()[q] - base_ema[q]).abs().max() > 1e-2  # B A really moved the weights


def OmegaConf_load(run_dir):
    from omegaconf import OmegaConf

    from trainer.config import TrainConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                               OmegaConf.load(os.path.join(run_dir, "config.yaml"))))


def test_two_model_stage_survives_sigkill_bitwise(run_root):
    common = ["experiment=test_tiny", f"run_root={run_root}", TWO_MODELS]
    run_training(*common, "name=straight")
    straight = final_state(os.path.join(run_root, "straight"))
    assert {"model", "optimizer", "ema", "critic", "critic_optimizer", "critic_ema", "stage"} <= straight.keys()
    assert "reference" not in straight  # frozen: not re-saved, its source recorded instead
    step_dir = os.path.join(run_root, "straight", "checkpoints", "step_00000012")
    assert read_models(step_dir)["reference"]["frozen"] is True

    args = [*common, "name=killed"]
    run_dir = os.path.join(run_root, "killed")
    from tests.conftest import last_logged_step

    first = kill_when(args, run_dir, lambda d: last_logged_step(d) >= 4)
    kill_when(args, run_dir, lambda d, s=first: last_logged_step(d) >= s + 4)
    run_training(*args)
    assert_bitwise_equal(straight, final_state(run_dir))


def test_a_run_of_non_finite_steps_fails_with_the_step_and_what_to_try(run_root):
    from trainer.preemption import read_status

    proc = subprocess.run(train_cmd("experiment=test_tiny", f"run_root={run_root}", "name=nan",
                                    "stage.kind=tests.trainer.stages:NaNStage", "stage.max_nonfinite_steps=3"),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "step 6: 3 steps in a row (steps 4-6) had a non-finite gradient norm" in proc.stderr
    assert "optimizer.lr" in proc.stderr
    assert read_status(os.path.join(run_root, "nan"))["state"] == "failed"
    # the weights of step 3 are intact in its checkpoint, and nothing later was saved
    assert list_checkpoints(os.path.join(run_root, "nan", "checkpoints")) == [3]
    with open(os.path.join(run_root, "nan", "train.log")) as f:
        log = f.read()
    assert log.count("update skipped") == 3 and "failed: step 6" in log


def test_lora_run_killed_and_restarted_is_bitwise_equal(base_run, run_root):
    """A LoRA run resumes exactly: its base is reloaded from the checkpoint's record, the
    adapters, their optimizer and EMA from the checkpoint."""
    from tests.conftest import last_logged_step

    common = ["experiment=test_tiny", f"run_root={run_root}", "stage=sft", "stage.steps=8", "stage.lora.rank=4",
              "stage.ema_decay=0.5", "optimizer.lr=1e-2", f"checkpoint.init_from={base_run}"]
    run_training(*common, "name=straight")
    args = [*common, "name=killed"]
    kill_when(args, os.path.join(run_root, "killed"), lambda d: last_logged_step(d) >= 4)
    run_training(*args)
    straight, resumed = (final_state(os.path.join(run_root, n)) for n in ("straight", "killed"))
    assert set(straight["model"]) == {k for k in straight["model"] if ".lora_" in k}  # adapters only
    assert_bitwise_equal(straight, resumed)


def test_a_run_whose_ema_was_saved_under_wrapper_names_still_resumes(tmp_path):
    """Checkpoints written before names were cleaned (AC/compile runs) keep their EMA keys
    with wrapper segments; a resume maps them onto the model's own names."""
    from trainer.checkpoint import Checkpointer, TrainState
    from trainer.config import CheckpointConfig, TrainConfig
    from trainer.stage import Trainable

    cfg = TrainConfig(model=TINY)
    model = K2DiT(TINY)
    model.init_weights(0)
    old = Trainable.create(model, cfg, {})
    for s in old.ema.shadow:
        s.add_(torch.randn_like(s))
    old.ema.names = [n.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.") for n in old.ema.names]
    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(), SINGLE)
    ckpt.save(TrainState(step=1), {"model": old}, {}, {})
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(ckpt.path(1)).read_metadata().state_dict_metadata
    assert any(k.startswith("ema.blocks.0._checkpoint_wrapped_module.") for k in saved)  # as the old runs

    fresh = Trainable.create(K2DiT(TINY), cfg, {})
    ckpt.load(1, {"model": fresh}, {})
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.shadow, old.ema.shadow))
