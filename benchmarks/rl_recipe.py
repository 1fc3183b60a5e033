"""RL-stage recipes from the demo's base, trained and scored side by side: what each GRPO,
NFT or DPO setting does to the shapes-world accuracies (docs/RL.md).

Each recipe is one `trainer.train experiment=demo_grpo|demo_dpo` run from `--init` (a run
directory or an exported release file of the base) on the world's training captions,
then `trainer.evaluate` of it against that base (held-out compositions, training prompts
and one-shape prompts, 4 seeds each). The text encoder and autoencoder must be the ones
the base was trained with.

    python -m trainer.export runs/demo --to release --out runs/rlbase/demo_base.safetensors
    python benchmarks/rl_recipe.py --init runs/demo --encoder runs/demo/shards/text_encoder \\
        --vae runs/demo/autoencoder --recipes grpo grpo_soft               # on this CPU, one at a time
    python benchmarks/rl_recipe.py --init runs/rlbase/demo_base.safetensors --encoder ... --vae ... \\
        --device cuda --parallel 8 --recipes all
"""

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from demo_recipe import ROOT, train_and_score

GRPO = ["experiment=demo_grpo"]
DPO = ["experiment=demo_dpo"]
SOFT = ["++stage.grpo.reward_options={rubric:{soft:0.03}}"]
SOFT_DPO = ["++stage.dpo.reward_options={rubric:{soft:0.03}}"]
NFT = ["stage.grpo.objective=nft"]
P8 = ["stage.grpo.prompts_per_step=8", "stage.global_batch_size=64", "stage.micro_batch_size=64"]
# name -> overrides on top of the common ones; `steps` iterations each.
RECIPES = {
    "grpo": [*GRPO],
    "grpo_soft": [*GRPO, *SOFT],
    "grpo_soft_lr3": [*GRPO, *SOFT, "optimizer.lr=3e-4"],
    "grpo_soft_kl0": [*GRPO, *SOFT, "stage.grpo.kl_beta=0"],
    "grpo_soft_p8": [*GRPO, *SOFT, *P8],
    "grpo_soft_in2": [*GRPO, *SOFT, "stage.grpo.inner_steps=2"],
    "nft_soft": [*GRPO, *SOFT, *NFT],
    "nft_soft_lr3": [*GRPO, *SOFT, *NFT, "optimizer.lr=3e-4"],
    "nft_soft_lr1e3": [*GRPO, *SOFT, *NFT, "optimizer.lr=1e-3"],
    "dpo": [*DPO],
    "dpo_soft": [*DPO, *SOFT_DPO],
    "dpo_soft_lr3": [*DPO, *SOFT_DPO, "optimizer.lr=3e-4"],
}


def run_one(name: str, a) -> dict:
    args = [*RECIPES[name], "data=shapes", f"data.encoder_path={a.encoder}", f"data.vae_path={a.vae}",
            f"checkpoint.init_from={a.init}", f"stage.steps={a.steps}", "log.sample_every=0", "log.tensorboard=false",
            "checkpoint.every=100000", "checkpoint.keep=1", f"run_root={a.root}", f"name={name}",
            f"device={a.device}"]
    row = train_and_score(name, args, a)
    row["overrides"] = RECIPES[name]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the base: a run directory or a release .safetensors")
    p.add_argument("--encoder", required=True, help="the text encoder folder the base was trained with")
    p.add_argument("--vae", required=True, help="the shapes autoencoder folder the base was trained in")
    p.add_argument("--recipes", nargs="+", default=["grpo_soft"], help=f"names of {list(RECIPES)} or 'all'")
    p.add_argument("--steps", type=int, default=150, help="iterations per recipe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--root", default="/tmp/k2_rl_recipes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_recipe.json"))
    a = p.parse_args()
    a.init, a.encoder, a.vae = (os.path.abspath(x) for x in (a.init, a.encoder, a.vae))
    names = list(RECIPES) if a.recipes == ["all"] else a.recipes
    os.makedirs(a.root, exist_ok=True)
    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(lambda n: run_one(n, a), names))
    print("| recipe | s/iteration | held-out c/s/r/all | training all | one-shape all | reward (last) | kl (last) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        if r["rc"] != 0 or "scores" not in r:
            print(f"| {r['recipe']} | failed (rc {r['rc']}, see {a.root}/{r['recipe']}.out) |")
            continue
        s, b, m = r["scores"], r["baseline"], r["metrics_last"]
        ho, bho = s["held-out"], b["held-out"]
        print(f"| {r['recipe']} | {r['step_s']:.2f} | {ho['colours']:.0%}/{ho['shapes']:.0%}/{ho['relation']:.0%}/"
              f"{ho['all_correct']:.0%} (base {bho['all_correct']:.0%}) | {s['training']['all_correct']:.0%} "
              f"(base {b['training']['all_correct']:.0%}) | {s['one-shape']['all_correct']:.0%} "
              f"(base {b['one-shape']['all_correct']:.0%}) | {m.get('reward', float('nan')):.3f} | "
              f"{m.get('kl', float('nan')):.4f} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": a.device, "threads": a.threads, "parallel": a.parallel, "steps": a.steps,
                   "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
