"""DPO stage: the loss starts at ln 2 and the implicit accuracy rises above 0.5 on a toy
preference (brighter images win), with the reference frozen."""

import json
import math
import os

import numpy as np
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
def test_dpo_starts_at_ln2_and_learns_a_toy_preference(run_root, tiny_base):
    base = tiny_base
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


def _pair_folder(folder, n_pairs: int = 16) -> None:
    """A pair folder whose preference is known: each winner is a shapes image lightened
    towards white, its loser the same image darkened (the same caption)."""
    from PIL import Image

    from data.shapes import ShapesWorld

    world = ShapesWorld(image_size=32, seed=0)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for n in range(n_pairs):
        image, caption = world.sample(n)
        for role, pixels in (("winner", image // 2 + 127), ("loser", image // 2)):
            name = f"p{n:03d}-{role}.png"
            Image.fromarray(pixels.astype("uint8")).save(os.path.join(folder, name))
            rows.append({"file": name, "caption": caption, "pair": n, "role": role})
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _write_pair_shards(folder, out, encoder_dir) -> str:
    from data.latents import PixelLatents
    from data.text import TextEncoder
    from data.writer import WriterConfig, write_shards

    encoder = TextEncoder.from_pretrained(encoder_dir, layers=[1, 2, 3, 4], max_len=24)
    write_shards(str(folder), str(out), PixelLatents(), encoder, WriterConfig(resolution=32, bucket_multiple=16),
                 chunk_size=64, progress=None)
    return str(out)


@pytest.mark.slow
def test_dpo_on_a_stored_pair_set_starts_at_ln2_and_learns_its_preference(run_root, tiny_base, tiny_encoder_dir,
                                                                         tmp_path):
    """stage.dpo.pairs: pairs written by the shard writer from a folder (the layout human
    preference data comes in) instead of the policy's own rollouts."""
    _pair_folder(tmp_path / "pairs")
    shards = _write_pair_shards(tmp_path / "pairs", tmp_path / "pair_shards", tiny_encoder_dir)
    data = ["data=shards", f"data.path={shards}", f"data.encoder_path={tiny_encoder_dir}", "data.text_len=24",
            "data.image_size=32", "data.num_workers=0"]
    run_training("experiment=test_tiny", "stage=dpo", *data, f"++stage.dpo.pairs={shards}",
                 "stage.global_batch_size=8", "stage.micro_batch_size=8", "stage.dpo.prompts_per_step=4",
                 "stage.dpo.train_micro_batch=4", "stage.dpo.beta=2000", "optimizer.lr=3e-3",
                 "optimizer.warmup_steps=0", "log.every=1", "checkpoint.every=100", "log.sample_every=0",
                 f"run_root={run_root}", "name=dpo_pairs", f"checkpoint.init_from={tiny_base}",
                 "stage.steps=24")
    log = rows(os.path.join(run_root, "dpo_pairs"))
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[0]["implicit_acc"] == 0.0
    assert all(r["pairs"] == 4 for r in log)
    late = log[-8:]
    assert sum(r["implicit_acc"] for r in late) / len(late) > 0.5, [r["implicit_acc"] for r in log]


    # `python -m rl.pairs`: a model's own candidates ranked by a reward become a pair folder
    # the same writer reads; here brightness ranks, so each winner PNG is the brighter one.
    from PIL import Image

    from rl.pairs import PairSet, make_pairs

    made = tmp_path / "made"
    report = make_pairs(tiny_base, str(made), prompts=4, candidates=3, steps=4, guidance=0.0,
                        reward="tests/rl/toy_rewards")
    assert report["pairs"] == 4
    made_rows = [json.loads(line) for line in open(made / "captions.jsonl")]
    mean = {(r["pair"], r["role"]): np.asarray(Image.open(made / r["file"])).mean() for r in made_rows}
    assert all(mean[(n, "winner")] > mean[(n, "loser")] for n, _ in mean), mean
    assert len(PairSet(_write_pair_shards(made, tmp_path / "made_shards", tiny_encoder_dir), text_len=24)) == 4


def test_a_pair_set_with_a_lone_winner_or_two_prompts_is_refused(tiny_encoder_dir, tmp_path):
    from rl.pairs import PairSet

    folder = tmp_path / "pairs"
    _pair_folder(folder, n_pairs=3)
    lines = open(folder / "captions.jsonl").read().splitlines()
    with open(folder / "captions.jsonl", "w") as f:  # pair 2 loses its loser
        f.writelines(line + "\n" for line in lines if '"pair": 2, "role": "loser"' not in line)
    shards = _write_pair_shards(folder, tmp_path / "lone", tiny_encoder_dir)
    with pytest.raises(ValueError, match=r"pair 2 has only a winner .*needs a winner and a loser"):
        PairSet(shards, text_len=24)
    _pair_folder(folder, n_pairs=3)
    rows_ = [json.loads(line) for line in open(folder / "captions.jsonl")]
    rows_[1]["caption"] = "a red circle"  # pair 0's loser answers another prompt
    with open(folder / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows_)
    shards = _write_pair_shards(folder, tmp_path / "two_prompts", tiny_encoder_dir)
    with pytest.raises(ValueError, match=r"pair 0 has two prompts"):
        PairSet(shards, text_len=24)


def test_pair_draws_cover_every_pair_once_per_epoch_and_split_over_ranks(tiny_encoder_dir, tmp_path):
    from rl.pairs import PairSet

    _pair_folder(tmp_path / "pairs", n_pairs=6)
    ps = PairSet(_write_pair_shards(tmp_path / "pairs", tmp_path / "s", tiny_encoder_dir), text_len=24)
    assert len(ps) == 6
    stream = np.concatenate([ps.draw(seed=0, step=s, total=4) for s in range(3)])  # 12 draws = 2 epochs
    assert sorted(stream[:6]) == list(range(6)) and sorted(stream[6:]) == list(range(6))
    halves = [ps.draw(seed=0, step=1, total=4, rank=r, world_size=2) for r in (0, 1)]
    assert np.array_equal(np.concatenate(halves), ps.draw(seed=0, step=1, total=4))
    batch = ps.batch(np.array([0, 1]))
    # winners first, then losers; the winner is the lighter image of its pair (pixels in [-1, 1])
    assert batch["latents"].shape[0] == 4 and batch["captions"][0] == batch["captions"][2]
    assert bool((batch["latents"][:2].mean((1, 2, 3)) > batch["latents"][2:].mean((1, 2, 3))).all())
