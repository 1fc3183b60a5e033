"""One GRPO iteration of K2DiT on one device: SDE rollout, log-prob recomputation, clipped-ratio update.

The iteration is GRPOStage.step (rl/grpo.py) as the trainer runs it, with the text encoder,
the VAE decoder and the reward replaced by random text features, no decoding and random
scores: the benchmark times the two DiTs. The policy (AdamW, no EMA) and its frozen reference
are both resident on the device. `--prompts` x `--group` images are rolled out with
rl.sde.sde_rollout (guidance 3.0, `--sample-steps` steps, each but the last an SDE step); then
`--train-steps` of the SDE steps x all trajectories, in micro-batches of `--train-micro-batch`,
get the old log-probs (the policy's training-mode forward), the reference's means, and
`--inner-steps` AdamW updates of the clipped-ratio loss with KL to the reference.

Precision: `autocast` is what one process with parallel.param_dtype=bfloat16 runs
(trainer/stage.autocast): fp32 policy weights and AdamW state under bf16 autocast; `bf16`
keeps the policy's weights and AdamW state in bf16. The reference is in bf16 either way.
Default: the 2b config at 512² (1024 image tokens after VAE f8 + patch 2) with 512 text
tokens of which 300 are valid, 2 prompts x 8 images.

    python benchmarks/grpo_step.py                         # autocast, no activation checkpointing
    python benchmarks/grpo_step.py --ac                    # per-block activation checkpointing
    python benchmarks/grpo_step.py --precision bf16 --ac   # bf16 policy weights and AdamW state
    python benchmarks/grpo_step.py --tiny --device cpu     # smoke check on a laptop
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from train_step import load_config  # the model config by name, or the tiny one (--tiny)

from rl.config import GRPOConfig
from rl.grpo import GRPOStage
from rl.rewards import RewardOutput
from trainer.config import OptimizerConfig, ParallelConfig, TrainConfig
from trainer.model import ModelConfig, flops_per_sample
from trainer.parallel import Dist
from trainer.stage import Stage, Trainable, build_dit

ROOT = Path(__file__).resolve().parents[1]
NULL_VALID = 5  # valid tokens of the empty prompt: the chat template's suffix (data/text.py)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b", help="name of configs/model/<name>.yaml")
    p.add_argument("--tiny", action="store_true", help="tiny config and image, for a CPU smoke check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="autocast", choices=["autocast", "bf16"],
                   help="autocast: fp32 policy + AdamW state under bf16 autocast; bf16: bf16 policy + AdamW state")
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every policy block")
    p.add_argument("--image-size", type=int, default=512, help="pixels; tokens per side = size / 8 / patch")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--valid-text", type=int, default=300, help="valid (unpadded) text tokens per prompt")
    p.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    p.add_argument("--group", type=int, default=8, help="images per prompt")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--train-steps", type=int, default=4, help="SDE steps trained on per iteration")
    p.add_argument("--train-micro-batch", type=int, default=8, help="transitions per forward in the update")
    p.add_argument("--inner-steps", type=int, default=1, help="optimizer updates per rollout")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/grpo_step.json"))
    args = p.parse_args()
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if args.tiny:
        args.image_size, args.text_len, args.valid_text = 128, 16, 10
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
    return args


def train_config(model: ModelConfig, args) -> TrainConfig:
    cfg = TrainConfig(model=model)
    cfg.data.image_size = args.image_size
    cfg.stage.kind, cfg.stage.ema_decay, cfg.stage.steps = "grpo", 0.0, args.warmup + args.iters
    cfg.stage.grpo = GRPOConfig(
        prompts_per_step=args.prompts, group_size=args.group, sample_steps=args.sample_steps,
        guidance=args.guidance, train_steps=args.train_steps, train_micro_batch=args.train_micro_batch,
        inner_steps=args.inner_steps,
    )  # fmt: skip
    cfg.stage.grpo.validate(1)
    cfg.optimizer = OptimizerConfig(lr=1e-5, schedule="constant", warmup_steps=0)
    cfg.parallel = ParallelConfig(param_dtype="bfloat16", activation_checkpoint="full" if args.ac else "none")
    return cfg


class NoDecoder:
    """The VAE's place in RolloutStage.rollout: three latent channels as the 'image' (rewards are random)."""

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return latents_BCHW[:, :3].float()


class BenchGRPO(GRPOStage):
    """GRPOStage with random text features and random rewards in place of the encoder, decoder and world."""

    def __init__(self, cfg: TrainConfig, d: Dist, args):
        Stage.__init__(self, cfg, d, data=argparse.Namespace(latents=NoDecoder()), resume_dir=None)
        self.g = cfg.stage.grpo
        self.kl_over = 0
        policy, info = build_dit(cfg, d)
        if args.precision == "bf16":
            policy.to(torch.bfloat16)
        self.policy = policy
        self.trainables["model"] = Trainable.create(policy, cfg, info)
        self.reference = build_dit(cfg, d, trainable=False)[0].to(torch.bfloat16)
        side = cfg.data.image_size // 8
        self.latent_hw = (side, side)
        self.tokens = (side // cfg.model.patch_size) ** 2
        self.prompts = [f"prompt {i}" for i in range(self.g.prompts_per_step)]
        self.features, self.mask = random_text_features(len(self.prompts), cfg.model, args, d.device)
        self.reward_gen = torch.Generator().manual_seed(1)
        self.rollout_s = 0.0

    def _text(self, prompts: list[str]):
        idx = torch.tensor([self.prompts.index(p) for p in prompts], device=self.d.device)
        null = torch.full_like(idx, len(self.prompts))
        return self.features[idx], self.mask[idx], self.features[null], self.mask[null]

    def reward(self, images_BHWC, prompts: list[str]) -> RewardOutput:
        return RewardOutput(torch.rand(len(prompts), generator=self.reward_gen))

    def rollout(self, step: int) -> dict:
        sync(self.d.device)
        start = time.perf_counter()
        ro = super().rollout(step)
        sync(self.d.device)
        self.rollout_s = time.perf_counter() - start
        return ro


def random_text_features(n: int, m: ModelConfig, args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, mask) standing for n prompts of `args.valid_text` valid tokens and, last, the
    empty prompt: bf16 features, padding zeroed, on the device."""
    T = args.text_len
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n + 1, T, m.num_text_layers, m.text_dim, generator=gen)
    mask = torch.zeros(n + 1, T, dtype=torch.bool)
    mask[:-1, : args.valid_text] = True
    mask[-1, :NULL_VALID] = True
    return feats.masked_fill(~mask[:, :, None, None], 0.0).to(device, torch.bfloat16), mask.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(stage: BenchGRPO, args) -> dict:
    device = stage.d.device
    cuda = device.type == "cuda"
    rollout_s, iter_s = [], []
    try:
        for it in range(args.warmup + args.iters):
            sync(device)
            start = time.perf_counter()
            values = stage.step(it)
            sync(device)
            if it >= args.warmup:
                rollout_s.append(stage.rollout_s)
                iter_s.append(time.perf_counter() - start)
            if it == 0 and cuda:
                resident = torch.cuda.memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        return {"oom": True, "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    rollout, iteration = sum(rollout_s) / len(rollout_s), sum(iter_s) / len(iter_s)
    return {
        "oom": False,
        "rollout_s": rollout,
        "train_s": iteration - rollout,
        "iteration_s": iteration,
        "resident_mem_gib": resident if cuda else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "metrics": {k: float(values[k]) for k in ("loss", "kl", "ratio_first_dev", "logp_gap", "grad_norm")},
    }


def main() -> None:
    args = parse_args()
    model_cfg = load_config(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    cfg = train_config(model_cfg, args)
    stage = BenchGRPO(cfg, Dist(0, 1, 0, device, None), args)
    params = sum(p.numel() for p in stage.policy.parameters())
    r = run(stage, args)

    B, L, g = args.prompts * args.group, stage.tokens, cfg.stage.grpo
    forward = flops_per_sample(model_cfg, args.text_len, L) / 3
    calls = 2 if g.guidance != 0 else 1
    transitions = g.train_steps * B
    rollout_flops = g.sample_steps * calls * B * forward
    # Old log-probs: policy + reference forwards; each inner step: policy forward + backward.
    train_flops = transitions * calls * forward * (2 + 3 * g.inner_steps)
    policy_w = "fp32 master, bf16 autocast" if args.precision == "autocast" else "bf16"
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    print(f"model {model_cfg.name} ({size} params each) | {args.prompts} prompts x {args.group} images | "
          f"{args.image_size}² ({L} image tokens) + {args.text_len} text ({args.valid_text} valid) | "
          f"{g.sample_steps} steps, CFG {g.guidance}, {g.train_steps} trained, micro-batch {g.train_micro_batch} | "
          f"policy {policy_w}, reference bf16 | AC {'on' if args.ac else 'off'} | {args.device}")  # fmt: skip
    if r["oom"]:
        print(f"out of memory (peak {r['peak_mem_gib']:.1f} GiB): try --ac or a smaller --train-micro-batch")
    else:
        def mfu(flops: float, seconds: float) -> str:
            return f"{100 * flops / seconds / (args.peak_tflops * 1e12):.1f}%" if device.type == "cuda" else "-"

        rows = [
            ("rollout", r["rollout_s"], f"{B / r['rollout_s']:.2f} images/s", mfu(rollout_flops, r["rollout_s"])),
            ("train", r["train_s"], f"{transitions / r['train_s']:.2f} transitions/s", mfu(train_flops, r["train_s"])),
            ("iteration", r["iteration_s"], f"{B / r['iteration_s']:.2f} images/s",
             mfu(rollout_flops + train_flops, r["iteration_s"])),
        ]  # fmt: skip
        print("| phase | seconds | throughput | MFU |\n|---|---:|---:|---:|")
        for name, seconds, rate, util in rows:
            print(f"| {name} | {seconds:.3f} | {rate} | {util} |")
        if r["peak_mem_gib"] is not None:
            print(f"memory: {r['resident_mem_gib']:.1f} GiB resident (weights, AdamW state, text features), "
                  f"{r['peak_mem_gib']:.1f} GiB peak")
        r["rollout_images_per_s"] = B / r["rollout_s"]
        r["train_transitions_per_s"] = transitions / r["train_s"]
        if device.type == "cuda":
            r["rollout_mfu"] = rollout_flops / r["rollout_s"] / (args.peak_tflops * 1e12)
            r["train_mfu"] = train_flops / r["train_s"] / (args.peak_tflops * 1e12)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    record = {
        "args": vars(args),
        "model": model_cfg.name,
        "device": device_name,
        "torch": torch.__version__,
        "policy_weights": policy_w,
        "reference_weights": "bf16",
        "params_per_model": params,
        "image_tokens": L,
        "rollout_flops": rollout_flops,
        "train_flops": train_flops,
        "results": r,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
