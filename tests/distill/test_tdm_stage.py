"""The TDM stage in the trainer: kill -9 at random steps ends bitwise equal to an
uninterrupted run (student, fake score, both optimizers, the student's EMA), the teacher is
never checkpointed, the LoRA student holds adapters only, and the student exports."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from trainer.weights import load_weights

from tests.conftest import ROOT, assert_bitwise_equal, final_state, flatten, last_logged_step, run_training, train_env
from tests.trainer.test_resume import kill_when

# A tiny teacher on the shapes world (the tests' pixel latents and tiny text encoder); a
# 4-segment student, 4 prompts per iteration in micro-batches of 2.
TDM = ["experiment=test_tiny", "stage=tdm", "stage.global_batch_size=4", "stage.micro_batch_size=4",
       "stage.tdm.segments=4", "stage.tdm.micro_batch=2", "stage.ema_decay=0.9", "optimizer.lr=1e-3",
       "optimizer.schedule=constant", "optimizer.warmup_steps=0", "log.every=1", "log.sample_every=0"]


def rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def teacher(tiny_base):
    return tiny_base


def test_tdm_killed_at_random_steps_resumes_bitwise(teacher, run_root):
    common = [*TDM, f"run_root={run_root}", f"checkpoint.init_from={teacher}", "stage.steps=8",
              "checkpoint.every=2"]
    run_training(*common, "name=straight")
    killed = os.path.join(run_root, "killed")
    rng = random.Random()
    first = rng.randrange(1, 4)
    second = rng.randrange(first + 1, 7)
    kill_when([*common, "name=killed"], killed, lambda d: last_logged_step(d) >= first)
    kill_when([*common, "name=killed"], killed, lambda d: last_logged_step(d) >= second)
    run_training(*common, "name=killed")

    straight_dir = os.path.join(run_root, "straight")
    state = final_state(straight_dir)
    assert_bitwise_equal(state, final_state(killed)), f"killed after steps {first} and {second}"
    assert [r["loss"] for r in rows(straight_dir)] == [r["loss"] for r in rows(killed)]
    keys = [k for k, _ in flatten(state)]
    # Student (weights, optimizer, EMA) and fake score (weights, optimizer) are all in it; the teacher is not.
    for part in ("model.", "optimizer.state.", "ema.", "fake_score.", "fake_score_optimizer.state."):
        assert any(k.startswith(part) for k in keys), part
    assert not any("teacher" in k or k.startswith("fake_score_ema") for k in keys)
    with open(os.path.join(straight_dir, "checkpoints", "step_00000008", "models.json")) as f:
        models = json.load(f)
    assert models["teacher"]["frozen"] and models["teacher"]["base"]["source"].startswith(teacher)
    # It trained: both models took updates and the logged terms are finite.
    last = rows(straight_dir)[-1]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("loss", "fake_loss", "teacher_fake_gap"))
    assert last["grad_norm"] > 0 and last["fake_grad_norm"] > 0


def test_lora_student_holds_adapters_only_and_exports(teacher, run_root):
    run_training(*TDM, f"run_root={run_root}", f"checkpoint.init_from={teacher}", "stage.steps=2",
                 "checkpoint.every=2", "stage.lora.rank=4", "name=lora")
    run_dir = os.path.join(run_root, "lora")
    keys = [k for k, _ in flatten(final_state(run_dir))]
    student = [k for k in keys if k.startswith("model.")]
    assert student and all("lora" in k for k in student), "a LoRA student checkpoints its adapters only"
    assert any(k.startswith("fake_score.blocks") for k in keys)  # the fake score is full weights
    out = os.path.join(run_root, "turbo_lora.safetensors")
    subprocess.run([sys.executable, "-m", "trainer.export", run_dir, "--to", "lora", "--out", out], cwd=ROOT,
                   env=train_env(), check=True, capture_output=True)
    assert len(load_file(out)) == len(student)  # every adapter matrix of the student, nothing else
    # Merged release export of the student equals teacher + the adapters it trained.
    release = os.path.join(run_root, "turbo.safetensors")
    subprocess.run([sys.executable, "-m", "trainer.export", run_dir, "--to", "release", "--merge-lora", "--out",
                    release], cwd=ROOT, env=train_env(), check=True, capture_output=True)
    merged = load_weights(run_dir, "ema").state_dict()
    teacher_sd = load_weights(teacher, "ema").state_dict()
    rel = load_weights(release).state_dict()
    moved = [k for k in merged if not torch.equal(merged[k], teacher_sd[k])]
    assert moved, "the student's merged weights differ from the teacher's"
    for k in merged:
        torch.testing.assert_close(rel[k], merged[k], rtol=0, atol=0)


def test_tdm_runs_under_two_process_fsdp_in_bf16_with_checkpointing(teacher, run_root):
    # Student, fake score and teacher sharded on one 2-rank mesh; each rank rolls out as far
    # as the furthest segment any rank drew, so their forwards (and collectives) line up.
    run_training(*TDM, f"run_root={run_root}", f"checkpoint.init_from={teacher}", "stage.steps=2",
                 "stage.micro_batch_size=2", "parallel.param_dtype=bfloat16", "parallel.activation_checkpoint=full",
                 "name=fsdp", nproc=2)
    run_dir = os.path.join(run_root, "fsdp")
    logged = rows(run_dir)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r[k])) for r in logged for k in ("loss", "fake_loss", "grad_norm"))
    keys = [k for k, _ in flatten(final_state(run_dir))]
    assert any(k.startswith("fake_score.blocks") for k in keys) and any(k.startswith("model.blocks") for k in keys)
    assert not any("teacher" in k for k in keys)
