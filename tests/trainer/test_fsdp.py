"""A 2-process gloo FSDP2 run follows the 1-process loss curve."""

import json
import os

import pytest

import torch

from tests.conftest import final_state, run_training


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


STEPS = 10


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process reference run both meshes are compared with."""
    root = str(tmp_path_factory.mktemp("runs"))
    run_training("experiment=test_tiny", f"run_root={root}", f"stage.steps={STEPS}", f"checkpoint.every={STEPS}",
                 "name=one", "stage.micro_batch_size=8")
    return os.path.join(root, "one")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp", "hsdp"])
def test_two_process_fsdp_matches_one_process(run_root, one_process, mesh):
    common = ["experiment=test_tiny", f"run_root={run_root}", f"stage.steps={STEPS}", f"checkpoint.every={STEPS}"]
    # fsdp: both ranks shard every block; hsdp: a (2 replicate x 1 shard) mesh
    two = ["name=two", "stage.micro_batch_size=4"] + (["parallel.dp_replicate=2"] if mesh == "hsdp" else [])
    run_training(*common, *two, nproc=2)
    one, two = losses(one_process), losses(os.path.join(run_root, "two"))
    assert len(one) == len(two) == STEPS
    for step, (a, b) in enumerate(zip(one, two), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: {a} vs {b}"
    # and the loss actually moved: the runs trained, not just agreed
    assert one[-1] < one[0]


@pytest.mark.slow
def test_lora_under_fsdp_ac_and_compile_matches_one_process(run_root):
    """LoRA adapters sharded with their frozen base by FSDP2, blocks checkpointed and compiled:
    2 gloo processes follow the 1-process curve and end with the same adapters, which trained."""
    common = ["experiment=test_tiny", f"run_root={run_root}"]
    run_training(*common, "name=base", "stage.steps=3")
    lora = [*common, "stage=sft", "stage.steps=8", "checkpoint.every=8", "stage.lora.rank=4", "optimizer.lr=1e-2",
            "optimizer.warmup_steps=0", f"checkpoint.init_from={os.path.join(run_root, 'base')}",
            "parallel.activation_checkpoint=full", "parallel.compile=true"]
    run_training(*lora, "name=one", "stage.micro_batch_size=8")
    run_training(*lora, "name=two", "stage.micro_batch_size=4", nproc=2)
    one, two = losses(os.path.join(run_root, "one")), losses(os.path.join(run_root, "two"))
    assert len(one) == len(two) == 8
    for step, (a, b) in enumerate(zip(one, two), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: {a} vs {b}"
    a, b = (final_state(os.path.join(run_root, n))["model"] for n in ("one", "two"))
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert all(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # B starts at zero: the adapters moved
