"""What a shapes-world run learned: generate for sets of prompts, check each image
against its caption, print the accuracies beside a baseline.

    python -m trainer.evaluate runs/demo [--seeds 2] [--steps 20] [--guidance 3]
    python -m trainer.evaluate runs/pink_sft --prompts concept          # the fine-tuning target
    python -m trainer.evaluate runs/demo --lora runs/pink_lora:0.8 --prompts concept,held-out

Prompt sets (`--prompts`, comma-separated; default held-out,training,one-shape):
  held-out   the world's eight compositions pretraining never shows (data/shapes.py);
  training   eight prompts of the pretraining distribution;
  one-shape  eight one-shape prompts, every colour and shape of pretraining;
  concept    `concept_prompts()` (pink, never in the pink SFT stream) and, as the set
             `concept-ref`, the same prompts with a colour pretraining knows in place of
             pink: how well the model draws those layouts at all;
  concept-seen  the same for eight pink compositions of the SFT stream's own distribution
             (`concept-seen` and `concept-seen-ref`): the concept itself, where `concept`
             asks for new compositions on top.

Scored: the newest checkpoint's EMA weights (live weights with --live), with any
`--lora PATH[:SCALE]` adapters merged on (trainer/weights.py's `load_weights`).
Baseline: the run's init model (`checkpoint.init_from`, an SFT run) labelled `base`;
with --lora, the same weights without the adapters (`base`); else the untrained model.
Each image counts as colours / shapes / relation right, and all-correct when all three
are. Writes `eval.json` and `eval.png` (baseline and scored rows per set) into the run
directory.
"""

import argparse
import json
import os

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from data.shapes import concept_prompts, concept_reference_prompts, concept_seen_prompts, score_caption
from data.shapes_loader import build_shapes_data
from data.sources import build_shard_data
from trainer.checkpoint import resolve_checkpoint
from trainer.config import TrainConfig
from trainer.lora_io import parse_lora
from trainer.model import K2DiT
from trainer.sample import generate, grid_image

PROMPT_SETS = ("held-out", "training", "one-shape", "concept", "concept-seen")
CHECKS = ("colours", "shapes", "relation", "all_correct")


def load_run_config(run_dir: str) -> TrainConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} has no config.yaml: not a k2train run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))


def score(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Share of images (N, 3, H, W in [-1, 1]) that show their prompt: colours, shapes and
    relation right (data.shapes.score_caption), and all three at once (all_correct)."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    checks = [score_caption(img, p) for img, p in zip(pixels, prompts)]
    for c in checks:
        c["all_correct"] = c["colours"] and c["shapes"] and c["relation"]
    return {k: float(np.mean([c[k] for c in checks])) for k in CHECKS}


def prompt_sets(names: list[str], world) -> dict[str, list[str]]:
    """{set name: prompts} for the names of PROMPT_SETS; "concept" gives concept and concept-ref,
    "concept-seen" concept-seen and concept-seen-ref."""
    unknown = [n for n in names if n not in PROMPT_SETS]
    if unknown or not names:
        raise ValueError(f"unknown prompt sets {unknown}; choose from {list(PROMPT_SETS)}")
    sets = {}
    for name in names:
        if name == "held-out":
            sets[name] = world.held_out_prompts()
        elif name == "training":
            sets[name] = world.train_prompts_example()
        elif name == "one-shape":
            sets[name] = world.one_shape_prompts()
        elif name == "concept":
            sets["concept"], sets["concept-ref"] = concept_prompts(), concept_reference_prompts()
        else:
            sets["concept-seen"], sets["concept-seen-ref"] = concept_seen_prompts(), concept_reference_prompts(True)
    return sets


def _grid(rows: list[tuple[str, torch.Tensor, list[str]]], cell: int = 128) -> np.ndarray:
    """One labelled strip per (label, images, captions) row, stacked."""
    strips = []
    for label, images, captions in rows:
        tiles = grid_image(images, captions, cell=cell, cols=len(captions))
        head = Image.new("RGB", (tiles.shape[1], 16), "white")
        ImageDraw.Draw(head).text((2, 2), label, fill="black")
        strips += [np.asarray(head), tiles]
    width = max(s.shape[1] for s in strips)
    return np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255)
                           for s in strips])


def evaluate(run_dir: str, seeds: int = 4, steps: int = 20, guidance: float = 3.0, live: bool = False,
             prompts: list[str] = ("held-out", "training", "one-shape"), loras: list[tuple[str, float]] = ()) -> dict:
    """Scores `run_dir` (and its baseline) on the prompt sets; writes eval.json / eval.png
    into it and returns the report: {"step", "weights", "baseline": label, label: scores,
    "trained": scores, ...}, scores being {set: {check: share of images}}."""
    from trainer.weights import load_weights  # run dirs, LoRA runs merged onto their base, releases

    cfg = load_run_config(run_dir)
    if cfg.data.name == "shapes":
        data = build_shapes_data(cfg.data, os.path.join(run_dir, "assets"), 1)
    elif cfg.data.name == "shards" and cfg.data.world == "shapes" and cfg.data.encoder_path:
        data = build_shard_data(cfg.data, 1, 0, 1, torch.device("cpu"))
    else:
        raise ValueError(f"{run_dir}: evaluate scores shapes-world runs: data.name=shapes, or data.name=shards with "
                         f"data.world=shapes and data.encoder_path (got data.name={cfg.data.name!r}, "
                         f"world={cfg.data.world!r})")
    side = cfg.data.image_size // data.latents.downsample
    sets = prompt_sets(list(prompts), data.world)
    which = "model" if live else "ema"
    loras = [(str(p), float(s)) for p, s in loras]

    def run(model):
        out, firsts = {}, {}
        for name, ps in sets.items():
            repeated = [p for p in ps for _ in range(seeds)]
            images = generate(model, data.encoder.encode, data.latents.decode, repeated, list(range(len(repeated))),
                              cfg.model, (side, side), steps, guidance, torch.device("cpu"))  # fmt: skip
            out[name] = score(images, repeated)
            firsts[name] = images[::seeds]
        return out, firsts

    # The baseline says what the scored weights changed: the model an SFT run started
    # from, the weights without the adapters, or (pretraining) the untrained model.
    if loras:
        label, baseline_src, baseline = "base", run_dir, load_weights(run_dir, which, model_cfg=cfg.model)
    elif cfg.checkpoint.init_from:
        label, baseline_src = "base", cfg.checkpoint.init_from
        baseline = load_weights(cfg.checkpoint.init_from, cfg.checkpoint.init_weights, model_cfg=cfg.model)
    else:
        label, baseline_src, baseline = "untrained", None, K2DiT(cfg.model)
        baseline.init_weights(cfg.seed)
    before, before_images = run(baseline)
    after, after_images = run(load_weights(run_dir, which, loras, model_cfg=cfg.model))
    step_dir = resolve_checkpoint(run_dir)
    step = int(os.path.basename(step_dir).split("_")[1]) if step_dir else None
    name = f"step {step}" if step is not None else "trained"
    if loras:
        name += " +lora"

    print(f"{run_dir}: {name} ({'live' if live else 'EMA'} weights"
          + "".join(f", lora {p} x{s:g}" for p, s in loras)
          + f") vs {label}{f' ({baseline_src})' if baseline_src else ''}; {seeds} seeds per prompt, "
          f"{steps} Euler steps, guidance {guidance}")  # fmt: skip
    print(f"{'prompts':<12} {'model':<16} {'colours':>8} {'shapes':>8} {'relation':>9} {'all correct':>12}")
    for s in sets:
        for model_name, r in ((label, before[s]), (name, after[s])):
            print(f"{s:<12} {model_name:<16} {r['colours']:>8.0%} {r['shapes']:>8.0%} {r['relation']:>9.0%} "
                  f"{r['all_correct']:>12.0%}")
    rows = [row for s in sets for row in ((f"{s}: {label}", before_images[s], sets[s]),
                                          (f"{s}: {name}", after_images[s], sets[s]))]
    Image.fromarray(_grid(rows)).save(os.path.join(run_dir, "eval.png"))
    report = {"step": step, "weights": which, "loras": [list(x) for x in loras], "baseline": label,
              "baseline_source": baseline_src, "prompts": sets, label: before, "trained": after}
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"grid: {os.path.join(run_dir, 'eval.png')}")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--live", action="store_true", help="score the live weights instead of the EMA")
    p.add_argument("--prompts", default="held-out,training,one-shape",
                   help=f"comma-separated prompt sets: {', '.join(PROMPT_SETS)}")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA run's adapters (repeatable; scale 1 by default)")
    a = p.parse_args(argv)
    with torch.no_grad():  # not a global switch: main() is also called in-process
        evaluate(a.run_dir, a.seeds, a.steps, a.guidance, a.live,
                 [s.strip() for s in a.prompts.split(",") if s.strip()], [parse_lora(x) for x in a.lora])


if __name__ == "__main__":
    main()
