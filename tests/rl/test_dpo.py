"""DPO stage: the loss starts at ln 2 and the implicit accuracy rises above 0.5 on a toy
preference (brighter images win), with the reference frozen."""

import json
import math
import os

import pytest

from tests.conftest import run_training

DPO = ["stage=dpo", "stage.global_batch_size=16", "stage.micro_batch_size=16", "stage.dpo.prompts_per_step=4",
       "stage.dpo.group_size=4", "stage.dpo.sample_steps=4", "stage.dpo.guidance=0", "stage.dpo.train_micro_batch=4",
       "++stage.dpo.rewards={rubric:0.0,tests/rl/toy_rewards:1.0}", "stage.dpo.beta=2000", "optimizer.lr=3e-3",
       "optimizer.warmup_steps=0", "log.every=1", "checkpoint.every=100"]


def rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_dpo_starts_at_ln2_and_learns_a_toy_preference(run_root):
    run_training("experiment=test_tiny", f"run_root={run_root}", "name=base", "stage.steps=2")
    base = os.path.join(run_root, "base")
    run_training("experiment=test_tiny", *DPO, f"run_root={run_root}", "name=dpo", f"checkpoint.init_from={base}",
                 "stage.steps=24")
    log = rows(os.path.join(run_root, "dpo"))
    # The policy is the reference before its first update: the bracket is exactly 0.
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[0]["implicit_acc"] == 0.0
    assert all(r["pairs"] == 4 for r in log)  # brightness always ranks 4 candidates apart
    late = log[-8:]
    acc = sum(r["implicit_acc"] for r in late) / len(late)
    assert acc > 0.5, [r["implicit_acc"] for r in log]
    # and the preference moved the samples: brighter than at the start
    assert sum(r["reward"] for r in late) / len(late) > sum(r["reward"] for r in log[:4]) / 4
