"""What a shapes-world run learned: generate for sets of prompts, check each image
against its caption, print the accuracies beside a baseline.

    python -m trainer.evaluate runs/demo [--seeds 2] [--steps 20] [--guidance 3]
    python -m trainer.evaluate runs/pink_sft --prompts concept          # the fine-tuning target
    python -m trainer.evaluate runs/demo --lora runs/pink_lora:0.8 --prompts concept,held-out
    python -m trainer.evaluate runs/demo runs/demo_pink runs/demo_dpo runs/demo_grpo --out runs/demo_stages
    python -m trainer.evaluate runs/demo_tdm --turbo                    # a Turbo student at its own sampler
    python -m trainer.evaluate runs/demo_grpo@steps=50,guidance=3 runs/demo_grpo@steps=8,guidance=0,mu=0.5 \
        runs/demo_tdm@turbo runs/demo_tdm+runs/demo_pink:1.0@turbo --out runs/demo_turbo

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
are. `--reward NAME[:KEY=VALUE,...]` (repeatable) adds the mean score of a reward of
rl/rewards per set, e.g. `--reward artifact:path=runs/demo/artifact` (P(clean)) or
`--reward diversity` (over the seeds of each prompt, one group per prompt). Writes
`eval.json` and `eval.png` (baseline and scored rows per set) into the run directory.
Several runs (the stages of one recipe) are scored on the same prompts and seeds into
one table and one grid under `--out` (stages.md, stages.json, stages.png).

Sampler: --steps (20), --guidance (3) and --mu (default: the shift of the image-token
count). --turbo: a TDM run's (stage.kind=tdm) own stage.tdm.segments steps and pinned
stage.tdm.mu, any other run Krea 2 Turbo's 8 steps and mu 1.15, guidance 0 either way;
explicit --steps / --guidance / --mu still win.

With --out, each run argument is a row spec `RUN[+LORA[:SCALE]]...[@SAMPLER]`: LoRAs merged
onto that row's weights, and its own sampler, SAMPLER being comma-separated `turbo`,
`steps=N`, `guidance=G`, `mu=M` (or `mu=auto`). The keys given replace those of the
command's sampler (of `turbo`'s, when it is named); a row without `@` samples as the command
says. The same run may appear in several rows.
"""

import argparse
import json
import math
import os
from dataclasses import replace

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from data.latents import images_to_uint8
from data.shapes import concept_prompts, concept_reference_prompts, concept_seen_prompts
from data.shapes_check import score_caption
from data.shapes_loader import build_shapes_data
from data.sources import build_shard_data
from trainer.checkpoint import resolve_checkpoint
from trainer.config import TrainConfig
from trainer.lora_io import parse_lora
from trainer.model import K2DiT
from trainer.sample import Sampler, generate, grid_image, turbo_sampler

PROMPT_SETS = ("held-out", "training", "one-shape", "concept", "concept-seen")
CHECKS = ("colours", "shapes", "relation", "all_correct")
DEFAULT_SAMPLER = Sampler(20, 3.0)  # without --turbo, --steps, --guidance, --mu
SAMPLER_KEYS = "turbo, steps=N (>= 1), guidance=G, mu=M or mu=auto"


def load_run_config(run_dir: str) -> TrainConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} has no config.yaml: not a k2train run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))


def score(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Share of images (N, 3, H, W in [-1, 1]) that show their prompt: colours, shapes and
    relation right (data.shapes_check.score_caption), and all three at once (all_correct)."""
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


def parse_reward(spec: str) -> tuple[str, dict]:
    """"artifact:path=DIR,batch=8" -> ("artifact", {"path": "DIR", "batch": 8}); values that
    read as numbers become numbers."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--reward {spec!r}: options are KEY=VALUE pairs separated by commas")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key] = value
    return name, options


def shapes_data(run_dir: str):
    """(run config, its data: text encoder, latents, world) of a shapes-world run."""
    cfg = load_run_config(run_dir)
    if cfg.data.name == "shapes":
        return cfg, build_shapes_data(cfg.data, os.path.join(run_dir, "assets"), 1)
    if cfg.data.name == "shards" and cfg.data.world == "shapes" and cfg.data.encoder_path:
        return cfg, build_shard_data(cfg.data, 1, 0, 1, torch.device("cpu"))
    raise ValueError(f"{run_dir}: evaluate scores shapes-world runs: data.name=shapes, or data.name=shards with "
                     f"data.world=shapes and data.encoder_path (got data.name={cfg.data.name!r}, "
                     f"world={cfg.data.world!r})")


class Scorer:
    """Generates every prompt of `sets` with `seeds` seeds (seed i for the i-th image of a
    set, so every model is scored on the same noise) and scores the images: the checks,
    and the mean of each of `rewards` (rl/rewards; diversity groups are a prompt's seeds)."""

    def __init__(self, cfg, data, sets: dict[str, list[str]], seeds: int, steps: int, guidance: float,
                 rewards: list[tuple[str, dict]] = (), mu: float | None = None):
        self.cfg, self.data, self.sets, self.seeds = cfg, data, sets, seeds
        self.sampler = Sampler(steps, guidance, mu)
        self.side = cfg.data.image_size // data.latents.downsample
        self.image_tokens = (self.side // cfg.model.patch_size) ** 2
        self.names = [n for n, _ in rewards]
        self.extra = None
        if rewards:
            from rl.rewards import build_reward

            self.extra = build_reward({n: 1.0 for n in self.names}, data.world, {n: o for n, o in rewards if o})

    def __call__(self, model, sampler: Sampler | None = None) -> tuple[dict, dict]:
        """({set: scores}, {set: the first seed's images}); `sampler` replaces the scorer's own."""
        s = sampler or self.sampler
        out, firsts = {}, {}
        for name, ps in self.sets.items():
            repeated = [p for p in ps for _ in range(self.seeds)]
            images = generate(model, self.data.encoder.encode, self.data.latents.decode, repeated,
                              list(range(len(repeated))), self.cfg.model, (self.side, self.side), s.steps,
                              s.guidance, torch.device("cpu"), mu=s.mu)  # fmt: skip
            out[name] = score(images, repeated)
            if self.extra is not None:
                details = self.extra(images_to_uint8(images).numpy(), repeated).details
                out[name].update({n: float(details[n].float().mean()) for n in self.names})
            firsts[name] = images[::self.seeds]
        return out, firsts


def run_sampler(run_cfg: TrainConfig, turbo: bool = False, steps: int | None = None, guidance: float | None = None,
                mu: float | None = None) -> Sampler:
    """The sampler a run is scored with: DEFAULT_SAMPLER, or with `turbo` its Turbo sampler
    (trainer/sample.py's turbo_sampler), each setting given (not None) replacing that one."""
    given = {k: v for k, v in (("steps", steps), ("guidance", guidance), ("mu", mu)) if v is not None}
    if given.get("steps", 1) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return replace(turbo_sampler(run_cfg) if turbo else DEFAULT_SAMPLER, **given)


def evaluate(run_dir: str, seeds: int = 4, steps: int | None = None, guidance: float | None = None,
             live: bool = False, prompts: list[str] = ("held-out", "training", "one-shape"),
             loras: list[tuple[str, float]] = (), rewards: list[tuple[str, dict]] = (), mu: float | None = None,
             turbo: bool = False) -> dict:
    """Scores `run_dir` (and its baseline) on the prompt sets, both with the sampler of
    `run_sampler` (steps, guidance, mu: None takes the default's or turbo's); writes eval.json /
    eval.png into it and returns the report: {"step", "weights", "steps", "guidance", "mu",
    "baseline": label, label: scores, "trained": scores, ...}, scores being {set: {check: share
    of images}} and mu the shift used."""
    from trainer.weights import load_weights  # run dirs, LoRA runs merged onto their base, releases

    cfg, data = shapes_data(run_dir)
    sets = prompt_sets(list(prompts), data.world)
    which = "model" if live else "ema"
    loras = [(str(p), float(s)) for p, s in loras]
    sampler = run_sampler(cfg, turbo, steps, guidance, mu)
    steps, guidance = sampler.steps, sampler.guidance
    run = Scorer(cfg, data, sets, seeds, steps, guidance, rewards, sampler.mu)
    mu_used = sampler.mu_used(run.image_tokens)

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
          f"{_sampler_words(sampler, mu_used)}")  # fmt: skip
    print(f"{'prompts':<12} {'model':<16} {'colours':>8} {'shapes':>8} {'relation':>9} {'all correct':>12}")
    for s in sets:
        for model_name, r in ((label, before[s]), (name, after[s])):
            print(f"{s:<12} {model_name:<16} {r['colours']:>8.0%} {r['shapes']:>8.0%} {r['relation']:>9.0%} "
                  f"{r['all_correct']:>12.0%}" + "".join(f" | {n} {r[n]:.3f}" for n in run.names))
    rows = [row for s in sets for row in ((f"{s}: {label}", before_images[s], sets[s]),
                                          (f"{s}: {name}", after_images[s], sets[s]))]
    Image.fromarray(_grid(rows)).save(os.path.join(run_dir, "eval.png"))
    report = {"step": step, "weights": which, "loras": [list(x) for x in loras], "steps": steps,
              "guidance": guidance, "mu": mu_used, "mu_pinned": sampler.mu is not None, "baseline": label,
              "baseline_source": baseline_src, "prompts": sets, label: before, "trained": after}
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"grid: {os.path.join(run_dir, 'eval.png')}")
    return report


def _same_path(a: str | None, b: str | None) -> bool:
    return a == b or (a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b))


def _sampler_words(sampler: Sampler, mu_used: float) -> str:
    how = "pinned" if sampler.mu is not None else "from the image-token count"
    return f"{sampler.steps} Euler steps, guidance {sampler.guidance}, mu {mu_used:.3g} ({how})"


def parse_stage_spec(spec: str) -> tuple[str, list[tuple[str, float]], dict | None]:
    """A row of compare_stages, `RUN[+LORA[:SCALE]]...[@SAMPLER]` -> (RUN, [(LORA, SCALE)],
    SAMPLER as {"turbo": bool, and any of "steps", "guidance", "mu" (None: auto)} or None
    without @). A spec that is an existing path is a plain run, whatever it holds."""
    if os.path.exists(spec):
        return spec, [], None
    weights, at, sampler_text = spec.rpartition("@") if "@" in spec else (spec, "", "")
    run, *lora_specs = weights.split("+")
    if not run:
        raise ValueError(f"stage spec {spec!r}: no run before '+' or '@' (RUN[+LORA[:SCALE]]...[@SAMPLER])")
    loras = []
    for item in lora_specs:
        path, scale = parse_lora(item)
        if not path or not math.isfinite(scale):
            raise ValueError(f"stage spec {spec!r}: {'+' + item!r} is not +LORA[:SCALE] (a LoRA path, a number)")
        loras.append((path, scale))
    if not at:
        return run, loras, None
    if not sampler_text.strip():
        raise ValueError(f"stage spec {spec!r}: nothing after '@'; give comma-separated {SAMPLER_KEYS}")
    sampler, named = {"turbo": False}, set()
    for item in sampler_text.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if key in named:
            raise ValueError(f"stage spec {spec!r}: {key!r} given twice after '@'")
        named.add(key)
        if item.strip() == "turbo":
            sampler["turbo"] = True
            continue
        try:
            if not eq or key not in ("steps", "guidance", "mu"):
                raise ValueError
            if key == "steps":
                sampler[key] = int(value)
                if sampler[key] < 1:
                    raise ValueError
            elif key == "mu" and value == "auto":
                sampler[key] = None
            else:
                sampler[key] = float(value)
                if not math.isfinite(sampler[key]):
                    raise ValueError
        except ValueError:
            raise ValueError(f"stage spec {spec!r}: {item!r} is not a sampler setting; after '@' give "
                             f"comma-separated {SAMPLER_KEYS}") from None
    return run, loras, sampler


def compare_stages(run_dirs: list[str], out_dir: str, seeds: int = 4, steps: int | None = None,
                   guidance: float | None = None, prompts: list[str] = ("held-out", "training", "one-shape"),
                   rewards: list[tuple[str, dict]] = (), mu: float | None = None, turbo: bool = False) -> dict:
    """Scores the runs of a recipe (pretraining, SFT, DPO, GRPO, ...) on the same prompts
    and seeds, each run's newest checkpoint (EMA weights; a LoRA run merged onto its
    base), and writes one table (stages.md), stages.json and one grid (stages.png: a
    strip per row and set, the same noise in every column) into out_dir.

    Each of run_dirs is a row spec (parse_stage_spec): a run, LoRAs merged onto it and its
    sampler; a row without `@` samples with `run_sampler(its config, turbo, steps, guidance,
    mu)`. Labels name the sampler when the rows' samplers differ."""
    from trainer.weights import load_weights

    specs = [(spec, *parse_stage_spec(spec)) for spec in run_dirs]
    first = specs[0][1]
    cfg, data = shapes_data(first)
    sets = prompt_sets(list(prompts), data.world)
    scorer = Scorer(cfg, data, sets, seeds, DEFAULT_SAMPLER.steps, DEFAULT_SAMPLER.guidance, rewards)
    planned, seen = [], {}
    for spec, run_dir, loras, row in specs:
        run_cfg = load_run_config(run_dir)
        if run_cfg.model != cfg.model or not _same_path(run_cfg.data.encoder_path, cfg.data.encoder_path):
            raise ValueError(f"{run_dir}: a different model or text encoder than {first} "
                             f"(model {run_cfg.model.name}, encoder {run_cfg.data.encoder_path!r}): the stages of one "
                             f"recipe share both")
        step_dir = resolve_checkpoint(run_dir)
        if step_dir is None:
            raise ValueError(f"{run_dir}: no checkpoint to score")
        sampler = run_sampler(run_cfg, turbo, steps, guidance, mu)
        if row is not None:
            base = turbo_sampler(run_cfg) if row["turbo"] else sampler
            sampler = replace(base, **{k: v for k, v in row.items() if k != "turbo"})
        key = (os.path.realpath(step_dir), tuple(loras), sampler)
        if key in seen:
            raise ValueError(f"stage specs {seen[key]!r} and {spec!r} are the same row (run, LoRAs and sampler)")
        seen[key] = spec
        planned.append((spec, run_dir, run_cfg, step_dir, loras, sampler))
    samplers = {p[-1] for p in planned}
    stages, rows = {}, []
    for spec, run_dir, run_cfg, step_dir, loras, sampler in planned:
        label = (f"{run_cfg.name} ({run_cfg.stage.name}, {os.path.basename(step_dir)})"
                 + "".join(f" + {os.path.basename(os.path.normpath(p))} x{s:g}" for p, s in loras)
                 + (f" · {sampler.describe()}" if len(samplers) > 1 else ""))  # fmt: skip
        scores, images = scorer(load_weights(run_dir, "ema", loras, model_cfg=cfg.model), sampler)
        stages[spec] = {"label": label, "run": run_dir, "stage": run_cfg.stage.name, "checkpoint": step_dir,
                        "loras": [list(x) for x in loras], "steps": sampler.steps, "guidance": sampler.guidance,
                        "mu": sampler.mu_used(scorer.image_tokens), "mu_pinned": sampler.mu is not None,
                        "scores": scores}  # fmt: skip
        rows += [(f"{name}: {label}", images[name], sets[name]) for name in sets]
        print(f"scored {label}", flush=True)
    names = list(sets)
    head = ("| run | " + " | ".join(f"{n}: colours / shapes / relation / all" for n in names)
            + "".join(f" | {r} ({names[0]})" for r in scorer.names) + " |")
    lines = [head, "| --- " * (1 + len(names) + len(scorer.names)) + "|"]
    for st in stages.values():
        sc = st["scores"]
        cells = [f"{sc[n]['colours']:.0%} / {sc[n]['shapes']:.0%} / {sc[n]['relation']:.0%} / "
                 f"**{sc[n]['all_correct']:.0%}**" for n in names]
        cells += [f"{sc[names[0]][r]:.3f}" for r in scorer.names]
        lines.append(f"| {st['label']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    order = sorted(range(len(rows)), key=lambda i: (i % len(names), i // len(names)))  # by set, then stage
    Image.fromarray(_grid([rows[i] for i in order])).save(os.path.join(out_dir, "stages.png"))
    # One sampler for every row: it is the table's; else each row's is in its label and record.
    one = next(iter(samplers)) if len(samplers) == 1 else None
    report = {"seeds": seeds, "steps": one.steps if one else None, "guidance": one.guidance if one else None,
              "mu": one.mu_used(scorer.image_tokens) if one else None, "prompts": sets, "rewards": scorer.names,
              "stages": stages}  # fmt: skip
    with open(os.path.join(out_dir, "stages.json"), "w") as f:
        json.dump(report, f, indent=2)
    how = _sampler_words(one, one.mu_used(scorer.image_tokens)) if one else "each row's sampler in its label"
    with open(os.path.join(out_dir, "stages.md"), "w") as f:
        f.write(f"{seeds} seeds per prompt, {how}\n\n{table}\n")
    print(f"grid: {os.path.join(out_dir, 'stages.png')}")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="+", metavar="RUN",
                   help="a run; several: compare them as stages of one recipe (--out), each RUN[+LORA[:SCALE]]..."
                        "[@SAMPLER] with SAMPLER comma-separated turbo, steps=N, guidance=G, mu=M|auto")
    p.add_argument("--out", help="with several runs: the folder for stages.md, stages.json and stages.png")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, help=f"Euler steps (default {DEFAULT_SAMPLER.steps}, or --turbo's)")
    p.add_argument("--guidance", type=float, help=f"guidance (default {DEFAULT_SAMPLER.guidance:g}, or --turbo's)")
    p.add_argument("--mu", type=float, help="timestep shift (default: the image-token count's, or --turbo's)")
    p.add_argument("--turbo", action="store_true",
                   help="few-step student: a TDM run's stage.tdm.segments steps and stage.tdm.mu, else 8 steps and "
                        "mu 1.15; guidance 0 (--steps/--guidance/--mu override)")
    p.add_argument("--live", action="store_true", help="score the live weights instead of the EMA")
    p.add_argument("--prompts", default="held-out,training,one-shape",
                   help=f"comma-separated prompt sets: {', '.join(PROMPT_SETS)}")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA run's adapters (repeatable; scale 1 by default)")
    p.add_argument("--reward", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="also report the mean score of this reward of rl/rewards per set (repeatable)")
    a = p.parse_args(argv)
    prompt_names = [s.strip() for s in a.prompts.split(",") if s.strip()]
    rewards = [parse_reward(x) for x in a.reward]
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if len(a.run_dir) > 1:
        if not a.out or a.lora or a.live:
            p.error("several runs are compared as stages: give --out, and no --lora or --live (a row's LoRAs: "
                    "RUN+LORA[:SCALE])")
        with torch.no_grad():
            compare_stages(a.run_dir, a.out, a.seeds, a.steps, a.guidance, prompt_names, rewards, a.mu, a.turbo)
        return
    run, loras, sampler = parse_stage_spec(a.run_dir[0])
    if loras or sampler is not None:
        p.error(f"{a.run_dir[0]!r}: RUN+LORA / RUN@SAMPLER rows are for several runs compared with --out; for one "
                f"run use --lora, --turbo, --steps, --guidance, --mu")
    with torch.no_grad():  # not a global switch: main() is also called in-process
        evaluate(run, a.seeds, a.steps, a.guidance, a.live, prompt_names, [parse_lora(x) for x in a.lora],
                 rewards, a.mu, a.turbo)


if __name__ == "__main__":
    main()
