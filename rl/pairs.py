"""(winner, loser) pairs from a shard set, for Diffusion-DPO (`stage.dpo.pairs=DIR`).

A pair set is an ordinary shard set (docs/SHARDS.md) whose samples carry two fields of
their caption file: `pair`, an id the two images of a pair share, and `role`, "winner" or
"loser". A folder of images with a `captions.jsonl` such as

    {"file": "p000012-w.png", "caption": "a red circle", "pair": 12, "role": "winner"}
    {"file": "p000012-l.png", "caption": "a red circle", "pair": 12, "role": "loser"}

written into shards with the policy's own text encoder and latent space

    python -m krablet.pipeline --input FOLDER --output DIR --encoder RUN/shards/text_encoder ...

is one; human preference data (two images of one prompt and a choice) fits the same
layout. `python -m rl.pairs RUN --out FOLDER` makes such a folder from a trained model's
own samples ranked by a reward (the best and the worst of each prompt's candidates).

Which pairs a step trains on is a pure function of (seed, step): pair n of the stream is
entry n mod P of the permutation of epoch n // P, so a resumed run needs no loader state.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from data.shard_loader import ShardIndex, ShardReader

ROLES = ("winner", "loser")


class PairSet:
    """The pairs of a shard set: `winners[i]`, `losers[i]` are sample indices of pair i."""

    def __init__(self, path: str, text_len: int, verify: str = "size"):
        self.index = ShardIndex(path)
        self.index.verify(verify)
        self.reader = ShardReader(self.index, text_len)
        self.path = path
        members: dict[object, dict[str, int]] = {}
        captions: dict[object, dict[str, str]] = {}
        for i in range(self.index.total):
            record, _ = self.reader.sample(i)
            where = f"{path}: sample {i} (source {record.get('source')!r})"
            if "pair" not in record or record.get("role") not in ROLES:
                raise ValueError(f"{where} has no 'pair' id and 'role' winner|loser in its record (got pair="
                                 f"{record.get('pair')!r}, role={record.get('role')!r}): not a DPO pair set")
            pair, role = record["pair"], record["role"]
            if role in members.setdefault(pair, {}):
                raise ValueError(f"{where}: pair {pair!r} has two {role}s (samples {members[pair][role]} and {i})")
            members[pair][role] = i
            captions.setdefault(pair, {})[role] = record["caption"]
        winners, losers = [], []
        for pair in sorted(members, key=str):
            got = members[pair]
            if set(got) != set(ROLES):
                raise ValueError(f"{path}: pair {pair!r} has only a {next(iter(got))} (sample "
                                 f"{next(iter(got.values()))}); each pair needs a winner and a loser")
            w, lo = got["winner"], got["loser"]
            if captions[pair]["winner"] != captions[pair]["loser"]:
                raise ValueError(f"{path}: pair {pair!r} has two prompts ({captions[pair]['winner']!r} vs "
                                 f"{captions[pair]['loser']!r}); winner and loser must answer the same prompt")
            if self.index.bucket[w] != self.index.bucket[lo]:
                raise ValueError(f"{path}: pair {pair!r}: winner and loser are in different buckets "
                                 f"({self.index.buckets[self.index.bucket[w]]} vs "
                                 f"{self.index.buckets[self.index.bucket[lo]]}); they share noise, so they need "
                                 f"one latent size")
            winners.append(w)
            losers.append(lo)
        if not winners:
            raise ValueError(f"{path}: no pairs")
        self.winners, self.losers = np.asarray(winners), np.asarray(losers)

    def __len__(self) -> int:
        return len(self.winners)

    def draw(self, seed: int, step: int, total: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's pair numbers for `step`: its slice of the step's `total` pairs of the stream."""
        n = len(self)
        pos = np.arange(step * total, (step + 1) * total)
        epochs = pos // n
        perms = {e: np.random.default_rng([seed, int(e), 7]).permutation(n) for e in np.unique(epochs)}
        chosen = np.array([perms[e][p % n] for e, p in zip(epochs, pos)])
        per_rank = total // world_size
        return chosen[rank * per_rank:(rank + 1) * per_rank]

    def batch(self, pairs: np.ndarray) -> dict:
        """Winners then losers of `pairs`: latents (2k, C, h, w), text (2k, T, K, D), text_mask, captions.
        ValueError if a sample's latents are unusable (a pair cannot lose one half)."""
        ids = np.concatenate([self.winners[pairs], self.losers[pairs]])
        out = self.reader.batch(0, 0, ids, np.zeros(self.index.total, bool))
        if out["skipped"]:
            bad = "; ".join(f"{s['shard']} {s['key']}: {s['reason']}" for s in out["skipped"])
            raise ValueError(f"{self.path}: pair samples with bad latents, refusing to train on them: {bad}")
        return out


# ---- making a pair folder from a model's own samples ---------------------------------------------
def make_pairs(run: str, out: str, prompts: int, candidates: int, seed: int = 0, steps: int = 20,
               guidance: float = 3.0, reward: str = "rubric", reward_options: dict | None = None,
               min_margin: float = 0.0) -> dict:
    """Sample `candidates` images for each of `prompts` training captions with RUN's model, rank
    them by `reward`, and write the best and the worst of each prompt into OUT as a pair folder
    (PNG files + captions.jsonl). Prompts whose candidates tie (margin <= min_margin) give no pair."""
    from PIL import Image

    from data.latents import images_to_uint8
    from rl.rewards import build_reward
    from trainer.evaluate import shapes_data
    from trainer.sample import generate
    from trainer.weights import load_weights

    cfg, data = shapes_data(run)
    model = load_weights(run, "ema", [], model_cfg=cfg.model)
    side = cfg.data.image_size // data.latents.downsample
    rng = np.random.default_rng(seed)
    captions = sorted(data.world.training_captions())
    chosen = [captions[i] for i in rng.choice(len(captions), prompts, replace=prompts > len(captions))]
    scorer = build_reward({reward: 1.0}, data.world, {reward: dict(reward_options)} if reward_options else None)
    os.makedirs(out, exist_ok=True)
    rows, margins = [], []
    for n, caption in enumerate(chosen):
        seeds = [(seed * 100_003 + n) * candidates + j for j in range(candidates)]
        pixels = generate(model, data.encoder.encode, data.latents.decode, [caption] * candidates, seeds, cfg.model,
                          (side, side), steps, guidance, torch.device("cpu"), mu=cfg.stage.flow.mu)
        images = images_to_uint8(pixels).numpy()
        scores = scorer(images, [caption] * candidates).scores.float().numpy()
        best, worst = int(scores.argmax()), int(scores.argmin())
        if scores[best] - scores[worst] <= min_margin:
            continue
        for role, j in (("winner", best), ("loser", worst)):
            name = f"p{n:06d}-{role[0]}.png"
            Image.fromarray(images[j]).save(os.path.join(out, name))
            rows.append({"file": name, "caption": caption, "pair": n, "role": role, "reward": float(scores[j])})
        margins.append(float(scores[best] - scores[worst]))
        if (n + 1) % 10 == 0 or n + 1 == len(chosen):
            print(f"pairs: {n + 1}/{len(chosen)} prompts, {len(margins)} pairs, mean margin "
                  f"{np.mean(margins) if margins else 0:.3f}", flush=True)
    tmp = os.path.join(out, "captions.jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, os.path.join(out, "captions.jsonl"))
    return {"prompts": len(chosen), "pairs": len(margins), "mean_margin": float(np.mean(margins)) if margins else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a k2train run directory (its EMA weights, text encoder and decoder)")
    p.add_argument("--out", required=True, help="folder to write the pair images and captions.jsonl into")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--reward", default="rubric")
    p.add_argument("--reward-options", default="{}", help='JSON, e.g. \'{"soft": 0.03}\'')
    p.add_argument("--min-margin", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.prompts < 1 or args.candidates < 2:
        p.error("--prompts must be >= 1 and --candidates >= 2")
    torch.set_grad_enabled(False)
    report = make_pairs(args.run, args.out, args.prompts, args.candidates, args.seed, args.steps, args.guidance,
                        args.reward, json.loads(args.reward_options), args.min_margin)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
