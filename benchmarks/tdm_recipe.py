"""TDM recipes from a shapes-world teacher, trained and scored side by side: what each
setting does to the 8-step, guidance-free student (docs/TDM.md).

Each recipe is one `trainer.train experiment=demo_tdm` run from `--teacher` (a run
directory or an exported release file), then the student is scored at its own sampler
(stage.tdm.segments steps, guidance 0, the pinned mu) on held-out compositions and
one-shape prompts, `--seeds` seeds each, beside the teacher at 50 steps with guidance 3,
at 8 steps with guidance 0 and at 8 steps with guidance 3, on the same prompts and noise.
`--lora FILE` also scores every student and the teacher with that LoRA merged on
(`--lora-prompts`, e.g. the pink concept's): the Raw -> Turbo transfer.

    python -m trainer.export runs/demo_grpo --to release --out runs/rlbase/demo_grpo.safetensors
    python benchmarks/tdm_recipe.py --teacher runs/rlbase/demo_grpo.safetensors --encoder runs/demo/shards/text_encoder \\
        --vae runs/demo/autoencoder --device cuda --parallel 8 --recipes all
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from demo_recipe import ROOT, train_and_score

sys.path.insert(0, str(ROOT))

TDM = ["experiment=demo_tdm"]
# name -> overrides on top of the common ones; `steps` iterations each.
RECIPES = {
    "tdm": [*TDM],
    "tdm_lr3e-4": [*TDM, "optimizer.lr=3e-4"],
    "tdm_lr3e-5": [*TDM, "optimizer.lr=3e-5"],
    "tdm_fake1": [*TDM, "stage.tdm.fake_lr_ratio=1"],
    "tdm_fake2x": [*TDM, "stage.tdm.fake_updates=2"],
    "tdm_mu115": [*TDM, "stage.tdm.mu=1.15"],
    "tdm_official_t": [*TDM, "stage.tdm.random_mid=true", "stage.tdm.within_segment=false"],
    "tdm_ema": [*TDM, "stage.ema_decay=0.99"],
    "tdm_g2": [*TDM, "stage.tdm.guidance=2"],
    "tdm_lora": [*TDM, "stage.lora.rank=16", "optimizer.lr=1e-3"],
    "tdm_lora_lr3": [*TDM, "stage.lora.rank=16", "optimizer.lr=3e-3"],
}


def scores_of(model, cfg, data, sets, seeds, steps, guidance, mu, device) -> dict:
    from trainer.evaluate import score
    from trainer.sample import generate

    side = cfg.data.image_size // data.latents.downsample
    out = {}
    for name, ps in sets.items():
        repeated = [p for p in ps for _ in range(seeds)]
        images = generate(model, data.encoder.encode, data.latents.decode, repeated, list(range(len(repeated))),
                          cfg.model, (side, side), steps, guidance, device, mu=mu)
        out[name] = score(images.cpu(), repeated)
    return out



def score_runs(rows: list[dict], a) -> dict:
    """The students at their sampler, and the teacher at three samplers, on the same prompts and noise."""
    from trainer.evaluate import prompt_sets, shapes_data
    from trainer.weights import load_weights

    ok = [r for r in rows if r["rc"] == 0]
    if not ok:
        return {}
    cfg, data = shapes_data(str(Path(a.root) / ok[0]["recipe"]))
    sets = prompt_sets(["held-out", "one-shape"], data.world)
    lora_sets = prompt_sets(a.lora_prompts.split(","), data.world) if a.lora else {}
    dev = torch.device(a.device)
    teacher = load_weights(a.teacher, model_cfg=cfg.model).to(dev)
    ref = {"teacher_50_g3": scores_of(teacher, cfg, data, sets, a.seeds, 50, 3.0, None, dev)}
    mus = sorted({load_cfg(Path(a.root) / r["recipe"]).stage.tdm.mu for r in ok})
    for mu in mus:
        ref[f"teacher_8_g0_mu{mu:g}"] = scores_of(teacher, cfg, data, sets, a.seeds, 8, 0.0, mu, dev)
        ref[f"teacher_8_g3_mu{mu:g}"] = scores_of(teacher, cfg, data, sets, a.seeds, 8, 3.0, mu, dev)
    if a.lora:
        t_lora = load_weights(a.teacher, loras=[(a.lora, 1.0)], model_cfg=cfg.model).to(dev)
        ref["teacher+lora_50_g3"] = scores_of(t_lora, cfg, data, lora_sets, a.seeds, 50, 3.0, None, dev)
        for mu in mus:
            ref[f"teacher+lora_8_g0_mu{mu:g}"] = scores_of(t_lora, cfg, data, lora_sets, a.seeds, 8, 0.0, mu, dev)
    for r in ok:
        run = Path(a.root) / r["recipe"]
        rc = load_cfg(run)
        t = rc.stage.tdm
        student = load_weights(str(run), "ema", model_cfg=cfg.model).to(dev)
        r["student"] = scores_of(student, cfg, data, sets, a.seeds, t.segments, 0.0, t.mu, dev)
        if a.lora:
            s_lora = load_weights(str(run), "ema", loras=[(a.lora, 1.0)], model_cfg=cfg.model).to(dev)
            r["student+lora"] = scores_of(s_lora, cfg, data, lora_sets, a.seeds, t.segments, 0.0, t.mu, dev)
        print(f"scored {r['recipe']}", flush=True)
    return ref


def load_cfg(run: Path):
    from trainer.evaluate import load_run_config

    return load_run_config(str(run))


def run_one(name: str, a) -> dict:
    args = [*RECIPES[name], "data=shapes", f"data.encoder_path={a.encoder}", f"data.vae_path={a.vae}",
            f"checkpoint.init_from={a.teacher}", f"stage.steps={a.steps}", "log.sample_every=0",
            "log.tensorboard=false", "checkpoint.every=100000", "checkpoint.keep=1", f"run_root={a.root}",
            f"name={name}", f"device={a.device}"]
    row = train_and_score(name, args, a, score=False)
    row["overrides"] = RECIPES[name]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher: a run directory or a release .safetensors")
    p.add_argument("--encoder", required=True, help="the text encoder folder the teacher was trained with")
    p.add_argument("--vae", required=True, help="the shapes autoencoder folder the teacher was trained in")
    p.add_argument("--lora", help="a LoRA file trained on the teacher (trainer.export --to lora): the transfer")
    p.add_argument("--lora-prompts", default="concept-seen", help="prompt sets the LoRA is scored on")
    p.add_argument("--recipes", nargs="+", default=["tdm"], help=f"names of {list(RECIPES)} or 'all'")
    p.add_argument("--steps", type=int, default=200, help="iterations per recipe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--root", default="/tmp/k2_tdm_recipes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tdm_recipe.json"))
    a = p.parse_args()
    a.teacher, a.encoder, a.vae = (os.path.abspath(x) for x in (a.teacher, a.encoder, a.vae))
    if a.lora:
        a.lora = os.path.abspath(a.lora)
    names = list(RECIPES) if a.recipes == ["all"] else a.recipes
    os.makedirs(a.root, exist_ok=True)
    with ThreadPoolExecutor(a.parallel) as pool:
        rows = list(pool.map(lambda n: run_one(n, a), names))
    torch.set_num_threads(max(1, a.threads))
    with torch.no_grad():
        ref = score_runs(rows, a)

    def cell(s):
        h, o = s["held-out"], s["one-shape"]
        return f"{h['colours']:.0%}/{h['shapes']:.0%}/{h['relation']:.0%}/**{h['all_correct']:.0%}** | {o['all_correct']:.0%}"

    print("| sampler / recipe | s/iteration | held-out c/s/r/all | one-shape all |" + (" LoRA sets all |" if a.lora else ""))
    print("| --- | ---: | --- | ---: |" + (" ---: |" if a.lora else ""))
    for k, s in ref.items():
        if "lora" in k:
            continue
        extra = ""
        if a.lora:
            lk = k.replace("teacher_", "teacher+lora_")
            extra = " " + "/".join(f"{v['all_correct']:.0%}" for v in ref[lk].values()) + " |" if lk in ref else " |"
        print(f"| {k} | – | {cell(s)} |{extra}")
    for r in rows:
        if "student" not in r:
            print(f"| {r['recipe']} | failed (rc {r['rc']}, see {a.root}/{r['recipe']}.out) |")
            continue
        extra = (" " + "/".join(f"{v['all_correct']:.0%}" for v in r["student+lora"].values()) + " |") if a.lora else ""
        print(f"| {r['recipe']} (8 steps, g 0) | {r['step_s']:.2f} | {cell(r['student'])} |{extra}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": a.device, "threads": a.threads, "parallel": a.parallel, "steps": a.steps,
                   "teacher": a.teacher, "lora": a.lora, "date": time.strftime("%Y-%m-%d"), "reference": ref,
                   "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
