"""Demo base-model recipes, trained and scored side by side: what each choice does to the
shapes-world accuracies (docs/DEMO_RECIPE.md).

Each recipe is one `trainer.train` run on the on-the-fly shapes stream (`data=shapes`,
the same images the demo's shards hold) in the autoencoder's latent space, then
`trainer.evaluate` (held-out compositions, training prompts and one-shape prompts, 4
seeds each). Runs go `--parallel` at a time, each process on `--threads` CPU threads
(2 mimics the demo's 2-core laptop) or on the GPU (`--device cuda`, where a recipe's
accuracies are the same and the run is quicker; its CPU time is measured separately
with `--time-steps`).

    python benchmarks/demo_recipe.py --vae runs/demo/shards/autoencoder --recipes base wide
    python benchmarks/demo_recipe.py --vae DIR --device cuda --parallel 6 --recipes all
    python benchmarks/demo_recipe.py --vae DIR --time-steps 30 --recipes base    # s/step on this CPU
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = ["data=shapes", "data.latents=shapes_ae", "log.every=50", "log.sample_every=0", "log.tensorboard=false",
          "checkpoint.every=100000", "checkpoint.keep=1", "optimizer.warmup_steps=100", "optimizer.min_lr_ratio=0.05"]
# The first sweep's base: the debug model at patch 1 (64 image tokens), 24 text tokens.
DEBUG = ["model=debug", "model.patch_size=1", "model.latent_channels=4", "data.image_size=32", "data.text_len=24"]
SMALL = ["model.dim=256", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_hidden=768", "model.num_blocks=6",
         "model.rope_axes=[16,24,24]"]
# What `experiment=demo` trains: the demo model (patch 2: 16 image tokens), 16 text tokens.
DEMO = ["model=demo", "data.image_size=32", "data.text_len=16", "stage.ema_decay=0.995"]
# The same at 64 px in the 64 px autoencoder's space (16x16x4: 64 image tokens at patch 2) ...
DEMO64 = ["model=demo", "data.image_size=64", "data.text_len=16", "stage.ema_decay=0.995", "data.vae_path={vae64}"]
# ... and in a 64 px, 8x, 8-channel one (8x8x8: 16 image tokens, as many as the demo's).
DEMO64X8 = ["model=demo", "model.latent_channels=8", "data.image_size=64", "data.text_len=16", "stage.ema_decay=0.995",
            "data.vae_path={vae64x8}"]
D192 = ["model.dim=192", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_hidden=512", "model.rope_axes=[8,20,20]"]
# name -> overrides on top of COMMON
RECIPES = {
    "base": [*DEBUG, "stage.steps=1500", "stage.global_batch_size=16", "optimizer.lr=1e-3", "stage.ema_decay=0.995"],
    "small": [*DEBUG, *SMALL, "stage.steps=3000", "stage.global_batch_size=16", "optimizer.lr=1.5e-3",
              "stage.ema_decay=0.995"],
    "small_b32": [*DEBUG, *SMALL, "stage.steps=1500", "stage.global_batch_size=32", "optimizer.lr=2e-3",
                  "stage.ema_decay=0.995"],
    "base_lr3": [*DEBUG, "stage.steps=1500", "stage.global_batch_size=16", "optimizer.lr=3e-3", "stage.ema_decay=0.995"],
    "base_shift": [*DEBUG, "stage.steps=1500", "stage.global_batch_size=16", "optimizer.lr=1e-3",
                   "stage.ema_decay=0.995", "stage.flow.mu=0"],
    "base_3k": [*DEBUG, "stage.steps=3000", "stage.global_batch_size=16", "optimizer.lr=1e-3", "stage.ema_decay=0.995"],
    "demo": [*DEMO, "stage.steps=1600", "stage.global_batch_size=32", "optimizer.lr=2e-3"],
    "demo_3k": [*DEMO, "stage.steps=3200", "stage.global_batch_size=32", "optimizer.lr=2e-3"],
    "demo_lr3": [*DEMO, "stage.steps=1600", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    "demo_mu0": [*DEMO, "stage.steps=1600", "stage.global_batch_size=32", "optimizer.lr=2e-3", "stage.flow.mu=0"],
    "demo_p1": [*DEMO, "model.patch_size=1", "stage.steps=1600", "stage.global_batch_size=16", "optimizer.lr=1.5e-3"],
    "demo64": [*DEMO64, "stage.steps=1600", "stage.global_batch_size=16", "optimizer.lr=1.5e-3"],
    "demo64_3k": [*DEMO64, "stage.steps=3200", "stage.global_batch_size=32", "optimizer.lr=2e-3"],
    "demo_3k_lr3": [*DEMO, "stage.steps=3200", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    "demo_3k_ema999": [*DEMO, "stage.steps=3200", "stage.global_batch_size=32", "optimizer.lr=3e-3",
                       "stage.ema_decay=0.999"],
    "demo_2k_b48": [*DEMO, "stage.steps=2200", "stage.global_batch_size=48", "optimizer.lr=3e-3"],
    "d192_5k": [*DEMO, *D192, "stage.steps=5000", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    "b4_5k": [*DEMO, "model.num_blocks=4", "stage.steps=4800", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    "demo64x8_3k": [*DEMO64X8, "stage.steps=3200", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    # Within the demo's CPU budget (2800 steps at batch 32, or as many samples at batch 48).
    "x8_2800": [*DEMO64X8, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    "x8_2800_lr2": [*DEMO64X8, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=2e-3"],
    "x8_1900_b48": [*DEMO64X8, "stage.steps=1900", "stage.global_batch_size=48", "optimizer.lr=3e-3"],
    "demo_2800": [*DEMO, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3"],
    "demo_2800_s1": [*DEMO, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3", "seed=1"],
    # Timestep shift: more of the training at high noise, where a shape's outline is decided.
    "demo_2800_mu1": [*DEMO, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3", "stage.flow.mu=1.0"],
    "demo_2800_mu1_s1": [*DEMO, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3",
                         "stage.flow.mu=1.0", "seed=1"],
    "demo_2800_mu15": [*DEMO, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3",
                       "stage.flow.mu=1.5"],
    "x8_2800_mu1": [*DEMO64X8, "stage.steps=2800", "stage.global_batch_size=32", "optimizer.lr=3e-3",
                    "stage.flow.mu=1.0"],
    # 64 image tokens on a narrower, shallower model: about the demo's CPU cost per step.
    "d192b4_64": [*DEMO64, *D192, "model.num_blocks=4", "stage.steps=3200", "stage.global_batch_size=32",
                  "optimizer.lr=3e-3"],
    "d192b4_64_mu1": [*DEMO64, *D192, "model.num_blocks=4", "stage.steps=3200", "stage.global_batch_size=32",
                      "optimizer.lr=3e-3", "stage.flow.mu=1.0"],
}


def run_one(name: str, overrides: list[str], a) -> dict:
    batch = next(o.split("=")[1] for o in overrides if o.startswith("stage.global_batch_size="))
    for key, folder in (("{vae64}", a.vae64), ("{vae64x8}", a.vae64x8)):
        if any(key in o for o in overrides) and not folder:
            raise SystemExit(f"recipe {name} needs --{key[1:-1]} (python -m data.autoencoder --out DIR --resolution 64 ...)")
        overrides = [o.replace(key, folder or "") for o in overrides]
    vae = [] if any(o.startswith("data.vae_path=") for o in overrides) else [f"data.vae_path={a.vae}"]
    args = [*COMMON, *vae, f"stage.micro_batch_size={batch}", *overrides, f"run_root={a.root}", f"name={name}",
            f"device={a.device}"]
    if a.time_steps:
        args += [f"stage.steps={a.time_steps}", "log.every=1"]
    row = train_and_score(name, args, a, score=not a.time_steps)
    row["overrides"] = overrides
    return row


def train_and_score(name: str, args: list[str], a, score: bool = True,
                    prompts: str = "held-out,training,one-shape") -> dict:
    """`trainer.train ARGS` into a.root/name, then `trainer.evaluate` of it (a.seeds seeds per
    prompt); the row also goes to a.root/name.json as soon as it is known."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=path, PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)
    run_dir = Path(a.root) / name
    t0 = time.perf_counter()
    with open(Path(a.root) / f"{name}.out", "w") as out:
        rc = subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    train_s = time.perf_counter() - t0
    row = {"recipe": name, "args": args, "rc": rc, "train_s": round(train_s, 1)}
    if rc != 0:
        with open(Path(a.root) / f"{name}.out") as f:
            row["log_tail"] = f.read()[-2000:]
        print(f"{name} failed (rc {rc}):\n{row['log_tail']}", flush=True)
        return row
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    row["final_loss"] = rows[-1]["loss"]
    row["metrics_last"] = rows[-1]
    steady = [r["step_s"] for r in rows[len(rows) // 3:]] or [rows[-1]["step_s"]]
    row["step_s"] = sorted(steady)[len(steady) // 2]
    if not score:
        return row
    with open(Path(a.root) / f"{name}.eval", "w") as out:
        subprocess.run([sys.executable, "-m", "trainer.evaluate", str(run_dir), "--seeds", str(a.seeds),
                        "--prompts", prompts], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    with open(run_dir / "eval.json") as f:
        report = json.load(f)
    row["scores"] = report["trained"]
    row["baseline"] = report[report["baseline"]]
    with open(Path(a.root) / f"{name}.json", "w") as f:  # each row as soon as it is known
        json.dump(row, f, indent=1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="the shapes autoencoder folder (python -m data.autoencoder)")
    p.add_argument("--vae64", help="the 64 px autoencoder folder, for the demo64 recipes")
    p.add_argument("--vae64x8", help="a 64 px, 8x, 8-channel autoencoder folder, for the demo64x8 recipes")
    p.add_argument("--recipes", nargs="+", default=["base"], help=f"names of {list(RECIPES)} or 'all'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps per recipe (no eval)")
    p.add_argument("--root", default="/tmp/k2_demo_recipes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_recipe.json"))
    a = p.parse_args()
    names = list(RECIPES) if a.recipes == ["all"] else a.recipes
    os.makedirs(a.root, exist_ok=True)
    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(lambda n: run_one(n, RECIPES[n], a), names))
    print("| recipe | steps×batch | s/step | train s | loss | held-out c/s/r/all | training all | one-shape all |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in results:
        if r["rc"] != 0:
            print(f"| {r['recipe']} | failed (rc {r['rc']}, see {a.root}/{r['recipe']}.out) |")
            continue
        s = r.get("scores")
        ho = s and s["held-out"]
        cells = (f"{ho['colours']:.0%}/{ho['shapes']:.0%}/{ho['relation']:.0%}/{ho['all_correct']:.0%} | "
                 f"{s['training']['all_correct']:.0%} | {s['one-shape']['all_correct']:.0%}") if s else "- | - | -"
        shape = next((o.split("=")[1] for o in r["overrides"] if o.startswith("stage.steps=")), "?") + "×" + next(
            (o.split("=")[1] for o in r["overrides"] if o.startswith("stage.global_batch_size=")), "?")
        print(f"| {r['recipe']} | {shape} | {r['step_s']:.3f} | {r['train_s']:.0f} | {r['final_loss']:.3f} | {cells} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": a.device, "threads": a.threads, "parallel": a.parallel, "date": time.strftime("%Y-%m-%d"),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
