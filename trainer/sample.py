r"""Sampling: `generate` (sample grids of the training loop and evaluate) and the sampler CLI.

    python -m trainer.sample runs/demo --prompt "a red circle above a blue square" --num-per-prompt 4 --out out/
    python -m trainer.sample /models/krea-2-raw --encoder /models/qwen3-vl-4b --vae /models/qwen-image-vae \
        --prompts-file prompts.txt --lora pink.safetensors:0.8 --seed 7 --out out/
    python -m trainer.sample runs/demo_tdm --turbo --prompt "a red circle above a blue square" --out out/
    python -m trainer.sample /models/krea-2-turbo --turbo --fast --float8 ...   # CUDA: compiled bf16 / float8

SOURCE is a k2train run, its checkpoints/ folder or one step folder (text encoder,
latent decoder and defaults come from the run's config.yaml; --encoder / --vae
override data.encoder_path / data.vae_path), or released weights: a diffusers folder
or a release .safetensors, which need --encoder (a Qwen3-VL folder) and --vae (a
Qwen-Image or FLUX.2 VAE folder, or "pixels[:DOWNSAMPLE]").

Sampler: --steps / --guidance default to a run's log.sample_steps / log.sample_guidance
(released weights: Krea 2 Raw's 52 steps, guidance 3.5), --mu to the shift of the image-token
count. --turbo samples a few-step student: a TDM run (stage.kind=tdm) at its own
stage.tdm.segments steps and pinned stage.tdm.mu, anything else at Krea 2 Turbo's 8 steps
and mu 1.15; guidance 0 either way. An explicit --steps / --guidance / --mu still wins.

Speed: padding past the longest prompt of a batch is dropped before the model runs (exact:
padded keys are never attended to), so a batch of one attends without a mask. On CUDA,
--fast casts the weights to bf16, compiles every block (FlexAttention where a batch is
still padded);
--float8 also runs the block linears in float8, each input made and quantised by one fused
row kernel (trainer/model/fp8_kernels.py; benchmarks/sample_speed.py).

Every prompt is checked before anything loads, every image before it is written
(trainer/safety.py). A refused prompt writes nothing at all; a refused image is left
out. Either way the exit code is 3. Output: one PNG per image
(`<index>_<seed>_<prompt slug>.png`; image i has seed SEED + i), grid.png, samples.json.
"""

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from trainer.flow import euler_sample, shift_mu
from trainer.lora_io import parse_lora
from trainer.model import ModelConfig, patchify, positions, unpatchify
from trainer.model.layers import fuse_projections

REFUSED_EXIT_CODE = 3
# Krea 2 taps 12 of Qwen3-VL-4B's 36 hidden states (configs/data/synthetic.yaml).
KREA2_TEXT_LAYERS = list(range(2, 36, 3))
# Krea 2 Raw's recommended sampling when no run says otherwise.
RAW_STEPS, RAW_GUIDANCE = 52, 3.5
# Krea 2 Turbo's: 8 Euler steps without guidance, the timestep shift pinned at 1.15 (the
# guidance is distilled into the weights, and the student was trained on these very times).
TURBO_STEPS, TURBO_GUIDANCE, TURBO_MU = 8, 0.0, 1.15


@dataclass(frozen=True)
class Sampler:
    """How `generate` integrates: Euler steps, guidance and timestep shift (None: the shift
    of the image-token count, trainer/flow.py's shift_mu)."""

    steps: int
    guidance: float
    mu: float | None = None

    def mu_used(self, image_tokens: int) -> float:
        return shift_mu(image_tokens) if self.mu is None else self.mu

    def describe(self) -> str:
        """"8 steps, g 0, mu 1.15"; no mu when it comes from the image-token count."""
        return f"{self.steps} steps, g {self.guidance:g}" + ("" if self.mu is None else f", mu {self.mu:g}")


def turbo_sampler(run_cfg=None) -> Sampler:
    """--turbo's sampler for a run's config (None: released weights): a TDM run's student
    samples as it was trained, stage.tdm.segments steps at its pinned stage.tdm.mu; anything
    else at Krea 2 Turbo's. Guidance 0 either way."""
    if run_cfg is not None and run_cfg.stage.kind == "tdm":
        return Sampler(run_cfg.stage.tdm.segments, 0.0, float(run_cfg.stage.tdm.mu))
    return Sampler(TURBO_STEPS, TURBO_GUIDANCE, TURBO_MU)


@torch.no_grad()
def generate(
    model: nn.Module,
    encode,
    decode,
    prompts: list[str],
    seeds: list[int],
    model_cfg: ModelConfig,
    latent_hw: tuple[int, int],
    steps: int,
    guidance: float,
    device: torch.device,
    *,
    mu: float | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W). `encode(prompts)` gives (text, mask); `decode` maps latents to pixels.

    mu: the timestep shift; None takes it from the image-token count (trainer/flow.py).
    """
    was_training = model.training
    model.eval()
    p = model_cfg.patch_size
    H, W = latent_hw
    # The model's own dtype for its inputs (a bf16 model for fast sampling); the Euler
    # integration stays fp32.
    dtype = next(model.parameters()).dtype
    text, mask = trim_padding(*(x.to(device) for x in encode(prompts)))
    null_text, null_mask = trim_padding(*(x.to(device) for x in encode([""] * len(prompts))))
    text, null_text = text.to(dtype), null_text.to(dtype)
    noise = torch.stack(
        [torch.randn(model_cfg.latent_channels, H, W, generator=torch.Generator().manual_seed(s)) for s in seeds]
    ).to(device)
    pos, null_pos = (positions(t.shape[1], H // p, W // p).to(device) for t in (text, null_text))

    def velocity(x_BLC, t_B, conditional):
        if conditional:
            return model(x_BLC.to(dtype), text, t_B, pos, mask).float()
        return model(x_BLC.to(dtype), null_text, t_B, null_pos, null_mask).float()

    x = euler_sample(velocity, patchify(noise, p), (H // p) * (W // p), steps, guidance, mu)
    model.train(was_training)
    return decode(unpatchify(x, p, H, W)).clamp(-1, 1)


def trim_padding(text_BTKD: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drops the text columns past the last valid token of every prompt; the mask becomes
    None when each kept token is valid (attention then runs unmasked: flash or cuDNN).

    Exact: padded keys are never attended to, text RoPE positions are all zero, and only
    the image tokens are read out, so the velocity does not depend on the dropped columns.
    """
    valid_T = mask_BT.bool().any(0)
    keep = int(valid_T.nonzero().max()) + 1 if bool(valid_T.any()) else 1
    text_BTKD, mask_BT = text_BTKD[:, :keep], mask_BT[:, :keep]
    return text_BTKD, None if bool(mask_BT.all()) else mask_BT


def fast_sampling(model: nn.Module, *, compile: bool = True, float8: str | bool | None = None,
                  attention: str | None = "flex", cuda_graphs: bool = False, fuse: bool = True,
                  reuse_text: bool = True, tune: bool = False) -> nn.Module:
    """Prepares `model` (K2DiT, on CUDA) for sampling speed, in place: bf16 weights,
    `reuse_text`: the text path run once per prompt batch (`TextFusion.reuse_output`),
    `fuse`: the projections of one input as one linear (q, k, v and gate; w_gate and w_up:
    wider GEMMs, the same function, another state dict: `fuse_projections`),
    optionally float8 block linears (``"fused"``: per-row scales, each input made and quantised
    by one row kernel, trainer/model/fp8_kernels.py; torchao's ``"row"`` (or True) / ``"tensor"``
    scales), the attention kernel for padded batches (flex;
    an unpadded one runs flash attention either way), and each block compiled
    (`cuda_graphs`: and replayed as a CUDA graph, torch.compile's "reduce-overhead"; `tune`:
    inductor's coordinate-descent search over each generated kernel's launch settings,
    a longer first run).

    float8 changes the numbers (benchmarks/sample_speed.py measures by how much against
    bf16); the rest computes the same function as the plain model.
    """
    model.to(torch.bfloat16).eval().requires_grad_(False)
    model.text_fusion.reuse_output = reuse_text
    if fuse:
        fuse_projections(model)
    if float8 == "fused":
        from trainer.model.fp8_kernels import convert_block

        if not all([convert_block(block) for block in model.blocks]):
            raise ValueError("float8='fused' needs the fused projections (fuse=True) of plain linears")
    elif float8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

        if float8 not in (True, "row", "tensor"):
            raise ValueError(f"float8 must be 'row', 'tensor' or 'fused', got {float8!r}")
        granularity = PerTensor() if float8 == "tensor" else PerRow()

        def eligible(m: nn.Module, fqn: str) -> bool:
            return isinstance(m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0

        for block in model.blocks:
            quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=eligible)
    if attention is not None:
        model.attention = attention
    if compile:
        from trainer.parallel import shardable_blocks

        options = {"triton.cudagraphs": cuda_graphs, "coordinate_descent_tuning": tune}
        for blocks in shardable_blocks(model):
            for i, block in enumerate(blocks):
                blocks[i] = torch.compile(block, fullgraph=True, options=options)
    return model


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> RGB uint8 (N, H, W, 3), the pixels a PNG holds."""
    pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def grid_image(images: torch.Tensor, captions: list[str], cell: int = 128, cols: int = 4) -> np.ndarray:
    """Tiles images with their captions underneath; returns an RGB uint8 (H, W, 3) array."""
    n = images.shape[0]
    rows = (n + cols - 1) // cols
    pad = 28
    canvas = Image.new("RGB", (cols * cell, rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = to_uint8(images)
    for i in range(n):
        tile = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + pad)
        canvas.paste(tile, (x, y))
        words, line, lines = captions[i].split(), "", []
        for word in words:  # wrap to two short lines
            if len(line) + len(word) > cell // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines[:2]), fill="black", spacing=1)
    return np.asarray(canvas)


# ---- the CLI ----------------------------------------------------------------------------------
def slug(prompt: str, max_len: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].strip("-")
    return s or "empty"


def run_dir_of(source: str) -> str | None:
    """The k2train run (folder with config.yaml) that a run, checkpoints/ or step folder belongs to."""
    from trainer.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(source) if os.path.isdir(source) else None
    if step_dir is None:
        return None
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    return run_dir if os.path.exists(os.path.join(run_dir, "config.yaml")) else None


@dataclass
class Pipeline:
    model: nn.Module
    encode: object  # prompts -> (text_BTKD, mask_BT)
    decode: object  # latents_BCHW -> images_BCHW in [-1, 1]
    downsample: int  # pixels per latent cell
    sampler: Sampler  # the default sampler, and --turbo's
    turbo: Sampler
    size: int  # the default --size
    text: dict  # how prompts were encoded, for samples.json


def load_pipeline(a: argparse.Namespace, loras: list[tuple[str, float]], device: torch.device) -> Pipeline:
    from trainer.weights import load_weights

    run_dir = run_dir_of(a.source)
    if run_dir is None and not (a.encoder and a.vae):
        missing = " and ".join(f for f, v in (("--encoder PATH (a Qwen3-VL folder)", a.encoder),
                                             ("--vae PATH (a Qwen-Image / FLUX.2 VAE folder, or 'pixels')", a.vae))
                               if not v)  # fmt: skip
        raise ValueError(f"{a.source} is not a k2train run (no config.yaml beside its checkpoints), so nothing says "
                         f"which text encoder and latent decoder it needs: pass {missing}")
    model = load_weights(a.source, a.weights, loras).to(device).eval()
    if run_dir is not None:
        return _run_pipeline(run_dir, model, a, device)
    return _released_pipeline(model, a, device)


def _run_pipeline(run_dir: str, model: nn.Module, a: argparse.Namespace, device: torch.device) -> Pipeline:
    from data.shapes_loader import build_shapes_data
    from data.sources import build_shard_data
    from trainer.evaluate import load_run_config

    cfg = load_run_config(run_dir)
    if a.encoder:
        cfg.data.encoder_path = a.encoder
    if a.vae:
        cfg.data.vae_path = a.vae
    cfg.data.num_workers = 0  # nothing is read from the shards but their index
    if cfg.data.name == "shapes":
        data = build_shapes_data(cfg.data, os.path.join(run_dir, "assets"), 1, device=device)
    elif cfg.data.name == "shards":
        data = build_shard_data(cfg.data, 1, 0, 1, device)
    else:
        raise ValueError(f"{run_dir} trained on data.name={cfg.data.name!r}, which has no text encoder or latent "
                         f"decoder; sample its weights as released ones: --encoder PATH --vae PATH")
    if data.encoder is None:
        raise ValueError(f"{run_dir}: its config sets no data.encoder_path; pass --encoder PATH (a Qwen3-VL folder)")
    if not hasattr(data.latents, "decode"):
        raise ValueError(f"{run_dir}: its config sets no data.vae_path for {data.latents.kind!r} latents; pass "
                         f"--vae PATH (a VAE folder)")
    return Pipeline(model, data.encoder.encode, data.latents.decode, data.latents.downsample,
                    Sampler(cfg.log.sample_steps, cfg.log.sample_guidance), turbo_sampler(cfg), cfg.data.image_size,
                    {"encoder": cfg.data.encoder_path or os.path.join(run_dir, "assets", "text_encoder"),
                     "layers": data.encoder.layers, "max_len": data.encoder.max_len})  # fmt: skip


def _released_pipeline(model: nn.Module, a: argparse.Namespace, device: torch.device) -> Pipeline:
    from data.text import TextEncoder

    cfg = model.cfg
    layers = a.text_layers or default_text_layers(a.encoder, cfg.num_text_layers)
    encoder = TextEncoder.from_pretrained(a.encoder, layers=layers, max_len=a.text_len, device=device)
    if (encoder.num_layers, encoder.dim) != (cfg.num_text_layers, cfg.text_dim):
        raise ValueError(f"--encoder {a.encoder} gives {encoder.num_layers} layers of width {encoder.dim}; the model "
                         f"fuses {cfg.num_text_layers} of width {cfg.text_dim}")
    latents = vae_latents(a.vae, device)
    if latents.channels != cfg.latent_channels:
        raise ValueError(f"--vae {a.vae} has {latents.channels} latent channels, the model {cfg.latent_channels} "
                         f"({cfg.in_channels} packed channels read with patch size {cfg.patch_size})")
    return Pipeline(model, encoder.encode, latents.decode, latents.downsample, Sampler(RAW_STEPS, RAW_GUIDANCE),
                    turbo_sampler(), 1024,
                    {"encoder": a.encoder, "layers": layers, "max_len": a.text_len})


def default_text_layers(encoder_path: str, num_layers: int) -> list[int]:
    """Which hidden states to tap when --text-layers is not given: Krea 2's, or all of a small encoder."""
    with open(os.path.join(encoder_path, "config.json")) as f:
        available = json.load(f)["text_config"]["num_hidden_layers"]
    if num_layers == len(KREA2_TEXT_LAYERS) and available == 36:
        return KREA2_TEXT_LAYERS
    if num_layers == available:
        return list(range(1, available + 1))
    raise ValueError(f"the model fuses {num_layers} text layers and {encoder_path} has {available}: say which with "
                     f"--text-layers (e.g. {','.join(map(str, range(available - num_layers + 1, available + 1)))})")


def vae_latents(spec: str, device: torch.device):
    """--vae: "pixels" / "pixels:N" (pixel space pooled by N), or a VAE (or pipeline) folder."""
    from data.latents import make_latents

    if spec == "pixels" or spec.startswith("pixels:"):
        return make_latents("pixels", pixel_downsample=int(spec.partition(":")[2] or 1))
    kinds = {"AutoencoderKLQwenImage": "qwen_image", "AutoencoderKLFlux2": "flux2", "ShapesAutoencoder": "shapes_ae"}
    for config in (os.path.join(spec, "config.json"), os.path.join(spec, "vae", "config.json")):
        if os.path.exists(config):
            with open(config) as f:
                name = json.load(f).get("_class_name")
            if name not in kinds:
                raise ValueError(f"--vae {spec}: {config} is a {name}, expected one of {sorted(kinds)}")
            return make_latents(kinds[name], spec, device=device)
    raise ValueError(f"--vae {spec}: no config.json (a VAE folder, a pipeline folder with vae/, or 'pixels')")


def read_prompts(a: argparse.Namespace) -> list[str]:
    prompts = list(a.prompt)
    for path in a.prompts_file:
        with open(path, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts-file FILE")
    return prompts


def sample(a: argparse.Namespace) -> int:
    """The CLI's work; returns the exit code."""
    from trainer.safety import build_checker

    prompts = read_prompts(a)
    checker = build_checker(a.blocklist, a.safety)
    refusals = [(i, p, checker.check_prompt(p)) for i, p in enumerate(prompts, 1)]
    refusals = [(i, p, v) for i, p, v in refusals if not v.allowed]
    for i, p, v in refusals:
        print(f'refused: prompt {i} ("{p}"): {v.reason}', file=sys.stderr)
    if refusals:
        return REFUSED_EXIT_CODE

    device = torch.device(a.device)
    loras = [parse_lora(s, a.lora_scale) for s in a.lora]
    pipe = load_pipeline(a, loras, device)
    if a.fast or a.float8:
        if device.type != "cuda":
            raise ValueError("--fast and --float8 need --device cuda (bf16 weights, compiled blocks, flash attention)")
        fast_sampling(pipe.model, float8="fused" if a.float8 else None)
    given = {k: v for k, v in (("steps", a.steps), ("guidance", a.guidance), ("mu", a.mu)) if v is not None}
    sampler = replace(pipe.turbo if a.turbo else pipe.sampler, **given)
    steps, guidance = sampler.steps, sampler.guidance
    size = a.size if a.size is not None else pipe.size
    patch = pipe.model.cfg.patch_size
    if size % (pipe.downsample * patch):
        raise ValueError(f"--size {size} must be a multiple of {pipe.downsample * patch} "
                         f"(latent downsample {pipe.downsample} x patch {patch})")
    side = size // pipe.downsample
    mu = sampler.mu_used((side // patch) ** 2)

    jobs = [(p, a.seed + i) for i, p in enumerate(p for p in prompts for _ in range(a.num_per_prompt))]
    batches = [jobs[i:i + a.batch_size] for i in range(0, len(jobs), a.batch_size)]
    records, kept, kept_captions = [], [], []
    for b, batch in enumerate(batches, 1):
        start = time.perf_counter()
        batch_prompts, batch_seeds = [p for p, _ in batch], [s for _, s in batch]
        images = generate(pipe.model, pipe.encode, pipe.decode, batch_prompts, batch_seeds, pipe.model.cfg,
                          (side, side), steps, guidance, device, mu=sampler.mu)  # fmt: skip
        pixels = to_uint8(images)
        verdicts = checker.check_images(pixels, batch_prompts)
        os.makedirs(a.out, exist_ok=True)
        for (prompt, seed), image, verdict in zip(batch, pixels, verdicts):
            index = len(records)
            record = {"index": index, "prompt": prompt, "seed": seed, "file": None, "refused": not verdict.allowed,
                      "reason": verdict.reason}  # fmt: skip
            if verdict.allowed:
                record["file"] = f"{index:04d}_{seed}_{slug(prompt)}.png"
                Image.fromarray(image).save(os.path.join(a.out, record["file"]))
                kept.append(image)
                kept_captions.append(prompt)
            else:
                print(f'refused: image {index} (prompt "{prompt}", seed {seed}): {verdict.reason}', file=sys.stderr)
            records.append(record)
        print(f"sampling {b}/{len(batches)} | images {len(records)}/{len(jobs)} | {size}px {steps} steps "
              f"guidance {guidance:g} mu {mu:.3g} | {time.perf_counter() - start:.1f}s", flush=True)  # fmt: skip

    grid = None
    if kept:
        grid = "grid.png"
        kept_BCHW = torch.from_numpy(np.stack(kept)).permute(0, 3, 1, 2).float() / 127.5 - 1
        cols = min(len(kept), 4)
        Image.fromarray(grid_image(kept_BCHW, kept_captions, cell=min(size, 256), cols=cols)).save(
            os.path.join(a.out, grid))
    num_refused = sum(r["refused"] for r in records)
    report = {
        "source": os.path.abspath(a.source),
        "weights": a.weights,
        "loras": [{"path": p, "scale": s} for p, s in loras],
        # mu: the shift used, pinned or the image-token count's (mu_pinned says which)
        "settings": {"steps": steps, "guidance": guidance, "mu": mu, "mu_pinned": sampler.mu is not None,
                     "turbo": a.turbo, "size": size, "latent_hw": [side, side],
                     "seed": a.seed, "num_per_prompt": a.num_per_prompt, "batch_size": a.batch_size,
                     "fast": a.fast or a.float8, "float8": a.float8,
                     "device": str(device), "text": pipe.text},  # fmt: skip
        "safety": repr(checker),
        "refused": num_refused,
        "grid": grid,
        "images": records,
    }
    with open(os.path.join(a.out, "samples.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {len(kept)} images to {a.out}" + (f" ({num_refused} refused)" if num_refused else ""))
    return REFUSED_EXIT_CODE if num_refused else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("source", help="k2train run / checkpoints / step folder, diffusers folder or release .safetensors")
    p.add_argument("--out", required=True, help="output folder (created only if something is written)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", action="append", default=[], help="one prompt per line (blank lines skipped)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file to merge (repeatable)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora entries without :SCALE")
    p.add_argument("--steps", type=int, help=f"Euler steps (default: the run's log.sample_steps, else {RAW_STEPS})")
    p.add_argument("--guidance", type=float,
                   help=f"guidance (default: the run's log.sample_guidance, else {RAW_GUIDANCE})")
    p.add_argument("--mu", type=float, help="timestep shift (default: from the image-token count)")
    p.add_argument("--turbo", action="store_true",
                   help=f"few-step student: a TDM run's stage.tdm.segments steps and stage.tdm.mu, else "
                        f"{TURBO_STEPS} steps and mu {TURBO_MU}; guidance 0 (--steps/--guidance/--mu override)")
    p.add_argument("--fast", action="store_true",
                   help="CUDA: bf16 weights, each block compiled (the first batch pays the compile), flash attention")
    p.add_argument("--float8", action="store_true",
                   help="--fast with float8 block linears (fused row kernels; close to bf16, not equal: "
                        "docs/BENCHMARKS.md)")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="images per generate call")
    p.add_argument("--size", type=int, help="image side in pixels (default: the run's data.image_size, else 1024)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="a k2train checkpoint's EMA or live weights")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--encoder", help="Qwen3-VL folder (needed for released weights; overrides a run's)")
    p.add_argument("--vae", help="VAE folder or 'pixels[:N]' (needed for released weights; overrides a run's)")
    p.add_argument("--text-layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="hidden states to tap, e.g. 2,5,8 (released weights; default: Krea 2's or all)")
    p.add_argument("--text-len", type=int, default=512, help="prompt tokens kept (released weights)")
    p.add_argument("--blocklist", action="append", default=[], metavar="FILE",
                   help="more blocked terms, one per line (whole-word, case-insensitive)")
    p.add_argument("--safety", metavar="package.module:Class",
                   help="checker after the blocklist (default: NoImageClassifier, which checks no images)")
    a = p.parse_args(argv)
    for flag in ("steps", "num_per_prompt", "batch_size", "size", "text_len"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    try:
        with torch.no_grad():  # not a global switch: main() is also called in-process
            code = sample(a)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    main()
