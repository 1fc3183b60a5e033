"""GRPO stage: ratio 1 and KL 0 at the first inner step under 2-process gloo FSDP in bf16,
exact resume, the reference never checkpointed."""

import json
import os

import pytest

from tests.conftest import assert_bitwise_equal, final_state, run_training

# A tiny policy on the shapes world (pixel latents, the tiny text encoder): 2 prompts x 4
# images per iteration, so each of 2 ranks rolls out a batch of 4 and trains on it in
# micro-batches of 2 transitions (the train batch sized apart from the rollout batch).
# Rewarded by brightness (tests/rl/toy_rewards.py): an untrained model passes no rubric.
GRPO = ["stage=grpo", "stage.global_batch_size=8", "stage.micro_batch_size=4", "stage.grpo.prompts_per_step=2",
        "stage.grpo.group_size=4", "stage.grpo.sample_steps=4", "stage.grpo.train_steps=2",
        "stage.grpo.train_micro_batch=2", "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "log.every=1",
        "++stage.grpo.rewards={rubric:0.0,tests/rl/toy_rewards:1.0}"]


def rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def base(tiny_base):
    return tiny_base


@pytest.mark.slow
def test_first_inner_step_has_ratio_one_and_kl_zero_under_fsdp_bf16(base, run_root):
    run_training("experiment=test_tiny", *GRPO, f"run_root={run_root}", "name=fsdp", f"checkpoint.init_from={base}",
                 "stage.steps=2", "stage.grpo.inner_steps=2", "parallel.param_dtype=bfloat16",
                 "parallel.activation_checkpoint=full", nproc=2)
    first, second = rows(os.path.join(run_root, "fsdp"))
    # Old log-probs come from the training forward itself: exactly ratio 1, and the policy
    # is the reference before its first update: KL exactly 0.
    assert first["ratio_first_dev"] == 0.0 and first["kl_first"] == 0.0
    # The second inner step moved off the rollout policy (the ratio is not trivially 1),
    # and the second iteration's policy is no longer the reference.
    assert (first["ratio_min"], first["ratio_max"]) != (1.0, 1.0)
    assert first["kl"] > 0.0  # the second inner step's policy has moved
    assert second["ratio_first_dev"] == 0.0 and second["kl_first"] > 0.0
    # bf16 rollouts against fp32 log-prob arithmetic: logged, not hidden.
    assert first["logp_gap"] >= 0.0
    for key in ("reward", "reward_rubric/all", "adv_abs", "clip_frac", "rollout_logp"):
        assert key in first, key


@pytest.mark.slow
def test_grpo_resumes_exactly_and_never_checkpoints_the_reference(base, run_root):
    # A constant learning rate: the split run's first half (stage.steps=2) follows the same
    # schedule as the straight run's first two steps.
    common = ["experiment=test_tiny", *GRPO, f"run_root={run_root}", f"checkpoint.init_from={base}",
              "checkpoint.every=2", "optimizer.schedule=constant"]
    run_training(*common, "name=straight", "stage.steps=4")
    run_training(*common, "name=split", "stage.steps=2")
    run_training(*common, "name=split", "stage.steps=4")  # resumes at step 2
    straight, split = (os.path.join(run_root, n) for n in ("straight", "split"))
    assert [r["reward"] for r in rows(straight)] == [r["reward"] for r in rows(split)]
    state = final_state(straight)
    assert_bitwise_equal(state, final_state(split))
    assert not any("reference" in k for k in state)
    with open(os.path.join(straight, "checkpoints", "step_00000004", "models.json")) as f:
        models = json.load(f)
    assert models["reference"]["frozen"] and models["reference"]["base"]["source"].startswith(base)
    # it trained: the policy moved away from the reference
    assert rows(straight)[-1]["kl"] > 0.0


def test_grpo_stops_early_when_a_guard_reward_falls(base, run_root):
    # The brightness of an untrained model's samples is far below 0.99: the guard trips
    # after stop_patience iterations, the run ends with a checkpoint and status "stopped".
    run_training("experiment=test_tiny", *GRPO, f"run_root={run_root}", "name=guard", f"checkpoint.init_from={base}",
                 "stage.steps=6", "stage.grpo.stop_reward=brightness", "stage.grpo.stop_below=0.99",
                 "stage.grpo.stop_patience=2", "checkpoint.every=100")
    run_dir = os.path.join(run_root, "guard")
    assert [r["step"] for r in rows(run_dir)] == [1, 2]
    assert all(r["reward_brightness"] < 0.99 for r in rows(run_dir))
    with open(os.path.join(run_dir, "status.json")) as f:
        assert json.load(f)["state"] == "stopped"
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000002"))
