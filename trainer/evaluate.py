"""What a shapes-world run learned: generate for held-out and training prompts,
check each image against its caption, print the accuracies.

    python -m trainer.evaluate runs/demo [--seeds 2] [--steps 20] [--guidance 3]

Scores the newest checkpoint's EMA weights (live weights with --live) beside the
untrained model, writes `eval.json` and `eval.png` into the run directory.
"""

import argparse
import json
import os

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.shapes import score_caption
from data.shapes_loader import build_shapes_data
from data.sources import build_shard_data
from trainer.checkpoint import load_model_weights
from trainer.config import TrainConfig
from trainer.model import K2DiT
from trainer.sample import generate, grid_image


def load_run_config(run_dir: str) -> TrainConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} has no config.yaml: not a k2train run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))


def load_weights(model: K2DiT, run_dir: str, which: str) -> int:
    """Loads `which` ("ema" or "model") of the newest checkpoint into `model`; returns its step."""
    folder = load_model_weights(model, run_dir, which)
    return int(os.path.basename(folder).split("_")[1])


def score(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    checks = [score_caption(img, p) for img, p in zip(pixels, prompts)]
    return {k: float(np.mean([c[k] for c in checks])) for k in ("colours", "shapes", "relation")}


def evaluate(run_dir: str, seeds: int = 2, steps: int = 20, guidance: float = 3.0, live: bool = False) -> dict:
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
    sets = {"held-out": data.world.held_out_prompts(), "training": data.world.train_prompts_example()}

    def run(model):
        out, grids = {}, []
        for name, prompts in sets.items():
            ps = [p for p in prompts for _ in range(seeds)]
            images = generate(model, data.encoder.encode, data.latents.decode, ps, list(range(len(ps))),
                              cfg.model, (side, side), steps, guidance, torch.device("cpu"))  # fmt: skip
            out[name] = score(images, ps)
            grids.append((images[::seeds], prompts))
        return out, grids

    untrained = K2DiT(cfg.model)
    untrained.init_weights(cfg.seed)
    before, _ = run(untrained)
    trained = K2DiT(cfg.model)
    step = load_weights(trained, run_dir, "model" if live else "ema")
    after, grids = run(trained)

    print(f"{run_dir}: step {step} ({'live' if live else 'EMA'} weights), {seeds} seeds per prompt, "
          f"{steps} Euler steps, guidance {guidance}")  # fmt: skip
    print(f"{'prompts':<10} {'model':<10} {'colours':>8} {'shapes':>8} {'relation':>9}")
    for name in sets:
        for label, res in (("untrained", before[name]), (f"step {step}", after[name])):
            r = res
            print(f"{name:<10} {label:<10} {r['colours']:>8.0%} {r['shapes']:>8.0%} {r['relation']:>9.0%}")
    images = torch.cat([g[0] for g in grids])
    captions = [p for g in grids for p in g[1]]
    Image.fromarray(grid_image(images, captions)).save(os.path.join(run_dir, "eval.png"))
    report = {"step": step, "weights": "live" if live else "ema", "untrained": before, "trained": after}
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"grid: {os.path.join(run_dir, 'eval.png')}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--live", action="store_true", help="score the live weights instead of the EMA")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    evaluate(a.run_dir, a.seeds, a.steps, a.guidance, a.live)


if __name__ == "__main__":
    main()
