"""One TDM iteration of K2DiT on one device, and Turbo sampling latency.

The iteration is TDMStage.step (distill/tdm.py) as the trainer runs it, with the text
encoder replaced by random text features: the student's rollout to the furthest drawn
segment, one fake-score update and one student update (teacher cond + uncond and the fake
score at the re-noised point), each phase timed apart. All three DiTs are resident: the
student and the fake score trained (fp32 master weights and AdamW state under bf16
autocast, or bf16 with --precision bf16), the teacher frozen in bf16.

`--latency` instead times Turbo sampling: 8 Euler steps, guidance 0 (one forward per step),
batch 1, bf16 weights, eager and with torch.compile, at `--image-size`.

    python benchmarks/tdm_step.py --image-size 1024 --ac              # 2b, one H200
    python benchmarks/tdm_step.py --latency --model 2b --image-size 1024
    python benchmarks/tdm_step.py --latency --model 12b --image-size 1024
    python benchmarks/tdm_step.py --tiny --device cpu                 # smoke check
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from grpo_step import random_text_features, sync  # the stand-in for the text encoder
from train_step import load_config  # the model config by name, or the tiny one (--tiny)

from distill.config import TDMConfig
from distill.tdm import TDMLoss, TDMStage
from trainer.config import OptimizerConfig, ParallelConfig, TrainConfig
from trainer.flow import euler_sample, sampling_times
from trainer.model import K2DiT, flops_per_sample, positions
from trainer.parallel import Dist
from trainer.stage import Stage, Trainable, build_dit

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="2b", help="name of configs/model/<name>.yaml")
    p.add_argument("--tiny", action="store_true", help="tiny config and image, for a CPU smoke check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="autocast", choices=["autocast", "bf16"])
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every block of the trained models")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--valid-text", type=int, default=300)
    p.add_argument("--batch", type=int, default=4, help="images per iteration")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--latency", action="store_true", help="time 8-step guidance-free sampling instead")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.tiny:
        a.image_size, a.text_len, a.valid_text, a.batch, a.micro_batch = 128, 16, 10, 2, 2
    return a


class BenchTDM(TDMStage):
    """TDMStage with random text features in place of the encoder and the world; phases timed."""

    def __init__(self, cfg: TrainConfig, d: Dist, a):
        Stage.__init__(self, cfg, d, data=argparse.Namespace(), resume_dir=None)
        self.g = cfg.stage.tdm
        self.student = build_dit(cfg, d)[0]
        self.fake = build_dit(cfg, d)[0]
        if a.precision == "bf16":
            self.student.to(torch.bfloat16)
            self.fake.to(torch.bfloat16)
        self.trainables["model"] = Trainable.create(self.student, cfg, {})
        self.trainables["fake_score"] = Trainable.create(self.fake, cfg, {}, ema_decay=0.0)
        self.teacher = build_dit(cfg, d, trainable=False)[0].to(torch.bfloat16)
        side = cfg.data.image_size // 8
        self.latent_hw = (side, side)
        self.tokens = (side // cfg.model.patch_size) ** 2
        self.loss = TDMLoss(self.g, sampling_times(self.g.segments, self.tokens, self.g.mu))
        self.prompts = [f"prompt {i}" for i in range(a.batch)]
        self.features, self.mask = random_text_features(a.batch, cfg.model, a, d.device)
        self.times_s: dict[str, float] = {}

    def draw_prompts(self, step, total, purpose="prompts"):
        return self.prompts[:total]

    def _text(self, prompts):
        idx = torch.tensor([self.prompts.index(p) for p in prompts], device=self.d.device)
        null = torch.full_like(idx, len(self.prompts))
        return self.features[idx], self.mask[idx], self.features[null], self.mask[null]

    def _timed(self, name, fn, *args):
        sync(self.d.device)
        t0 = time.perf_counter()
        out = fn(*args)
        sync(self.d.device)
        self.times_s[name] = time.perf_counter() - t0
        return out

    def rollout(self, *args):
        return self._timed("rollout", super().rollout, *args)

    def fake_update(self, *args, **kw):
        return self._timed("fake_update", lambda: super(BenchTDM, self).fake_update(*args, **kw))

    def student_update(self, *args, **kw):
        return self._timed("student_update", lambda: super(BenchTDM, self).student_update(*args, **kw))


def train_config(model, a) -> TrainConfig:
    cfg = TrainConfig(model=model)
    cfg.data.image_size = a.image_size
    cfg.stage.kind, cfg.stage.ema_decay, cfg.stage.steps = "tdm", 0.99, a.warmup + a.iters
    cfg.stage.global_batch_size = cfg.stage.micro_batch_size = a.batch
    cfg.stage.tdm = TDMConfig(segments=a.segments, micro_batch=a.micro_batch)
    cfg.optimizer = OptimizerConfig(lr=1e-6, betas=[0.0, 0.95], schedule="constant", warmup_steps=0)
    cfg.parallel = ParallelConfig(param_dtype="bfloat16", activation_checkpoint="full" if a.ac else "none")
    return cfg


def bench_step(a, model_cfg, device) -> dict:
    cfg = train_config(model_cfg, a)
    stage = BenchTDM(cfg, Dist(0, 1, 0, device, None), a)
    cuda = device.type == "cuda"
    resident = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    rows = []
    try:
        for it in range(a.warmup + a.iters):
            sync(device)
            t0 = time.perf_counter()
            values = stage.step(it)
            sync(device)
            if it >= a.warmup:
                rows.append({**stage.times_s, "iteration": time.perf_counter() - t0,
                             "segment_max": int(values["segment_max"])})
    except torch.OutOfMemoryError:
        return {"oom": True, "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("rollout", "fake_update", "student_update", "iteration")}
    fwd = flops_per_sample(model_cfg, a.text_len, stage.tokens) / 3
    B = a.batch
    flops = {"fake_update": 3 * fwd * B, "student_update": (3 + 3) * fwd * B}  # fwd+bwd, then teacher x2 + fake
    out = {"oom": False, **{f"{k}_s": v for k, v in mean.items()}, "segments_rolled": [r["segment_max"] + 1 for r in rows],
           "resident_mem_gib": resident,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
           "params_per_model": sum(p.numel() for p in stage.student.parameters()),
           "image_tokens": stage.tokens}
    if cuda:
        for k, f in flops.items():
            out[f"{k}_mfu"] = f / mean[k] / (a.peak_tflops * 1e12)
    return out


@torch.no_grad()
def bench_latency(a, model_cfg, device) -> dict:
    model = K2DiT(model_cfg).to(device, torch.bfloat16).eval()
    side = a.image_size // 8
    p = model_cfg.patch_size
    L, T = (side // p) ** 2, a.text_len
    text = torch.randn(1, T, model_cfg.num_text_layers, model_cfg.text_dim, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    mask[:, :a.valid_text] = True
    pos = positions(T, side // p, side // p).to(device)
    noise = torch.randn(1, L, model_cfg.latent_channels * p * p, device=device, dtype=torch.bfloat16)
    out = {}
    for name, net in (("eager", model), ("compiled", torch.compile(model))):
        def velocity(x, t_B, conditional):
            return net(x, text, t_B.to(x.dtype), pos, mask)

        for _ in range(2):  # warmup (and compile)
            euler_sample(velocity, noise, L, a.segments, guidance=0.0, mu=1.15)
        times = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            euler_sample(velocity, noise, L, a.segments, guidance=0.0, mu=1.15)
            sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = sorted(times)[len(times) // 2]
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out["image_tokens"] = L
    return out


def main() -> None:
    a = parse_args()
    model_cfg = load_config(a)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    r = bench_latency(a, model_cfg, device) if a.latency else bench_step(a, model_cfg, device)
    head = (f"model {model_cfg.name} | {a.image_size}² | {a.text_len} text ({a.valid_text} valid) | "
            f"{a.segments} segments | {a.device}")
    if a.latency:
        print(f"{head} | Turbo sampling, batch 1, guidance 0, bf16 weights")
        print(f"| eager | {r['eager_s']:.3f} s |\n| compiled | {r['compiled_s']:.3f} s |")
    elif r["oom"]:
        print(f"{head} | out of memory (peak {r['peak_mem_gib']:.1f} GiB): try --ac or a smaller --micro-batch")
    else:
        print(f"{head} | batch {a.batch}, micro-batch {a.micro_batch} | student + fake score "
              f"{a.precision}, teacher bf16 | AC {'on' if a.ac else 'off'}")
        print("| phase | seconds | MFU |\n| --- | ---: | ---: |")
        for k in ("rollout", "fake_update", "student_update", "iteration"):
            m = r.get(f"{k}_mfu")
            print(f"| {k} | {r[k + '_s']:.3f} | {f'{100 * m:.1f}%' if m else '-'} |")
        if r["peak_mem_gib"] is not None:
            print(f"memory: {r['resident_mem_gib']:.1f} GiB resident (three models, two AdamW states), "
                  f"{r['peak_mem_gib']:.1f} GiB peak")
    kind = "latency" if a.latency else "step"
    out = Path(a.out or ROOT / f"benchmarks/results/tdm_{kind}_{model_cfg.name}_{a.image_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    out.write_text(json.dumps({"args": vars(a), "model": model_cfg.name, "device": dev, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "results": r}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
