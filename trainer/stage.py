"""Stages: the unit that owns models and computes one optimizer step.

The loop (trainer/loop.py) keeps time — step count, preemption, checkpoint,
sample and validation cadence, logging. A stage builds everything else:

    stage = build_stage(cfg, d, data, resume_dir)   # models loaded, sharded, optimizers, EMAs
    stage.trainables   {name: Trainable}   checkpointed: weights, optimizer, EMA each
    stage.models_info()                    models.json: each model's config, LoRA, base, frozen sources
    stage.step(step)   -> metrics          one optimizer step (micro-batches, clip, update, EMA)
    stage.sampling()   context: the model to sample from (EMA weights swapped in)
    stage.sampler()    its sampler settings: steps, guidance, mu
    stage.validate(step) -> metrics | {}    a held-out loss, when the stage has one
    stage.state_dict() / load_state_dict()  the stage's own tensors besides its models

A stage reuses the pieces here instead of copying them: `build_dit` (init,
load, LoRA, AC/compile/FSDP; frozen models sharded without grads, AC or an
optimizer), `Trainable.create` (optimizer + EMA), `accumulate` (micro-batches
with gradient sync on the last) and `update` (clip, step, EMA, skip non-finite).

Pretraining, midtraining and SFT are all `FlowStage` and differ in data and
schedule. A stage defined outside k2train is named by `stage.kind=pkg.mod:Class`.
"""

import contextlib
import importlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from data.shapes_loader import ShapesData
from trainer.checkpoint import resolve_checkpoint
from trainer.config import TrainConfig
from trainer.lora import alpha_of, apply_lora, validate_lora
from trainer.model import K2DiT, ModelConfig, clean_name
from trainer.objectives import OBJECTIVES, FlowObjective, build_objective
from trainer.optim import EMA, build_optimizer, lr_at, set_lr, skips_on_device, step_unless, validate_schedule
from trainer.parallel import DTYPES, Dist, parallelize, set_gradient_sync
from trainer.repa import validate_repa
from trainer.titan import clip_grad_norm

log = logging.getLogger("k2train")


@dataclass
class Trainable:
    """A model a stage trains, with its optimizer and EMA (each checkpointed under the model's name)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    ema: EMA | None
    info: dict  # its models.json entry

    @classmethod
    def create(cls, module: nn.Module, cfg: TrainConfig, info: dict, ema_decay: float | None = None,
               optimizer_cfg=None) -> "Trainable":
        decay = cfg.stage.ema_decay if ema_decay is None else ema_decay
        return cls(module, build_optimizer(module, optimizer_cfg or cfg.optimizer),
                   EMA(module, decay) if decay > 0 else None, info)

    def tensors(self, name: str):
        """(name, local tensor) of everything a checkpoint of this model holds: weights,
        optimizer state and EMA (this rank's shards)."""
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                yield f"{name}.{clean_name(n)}", _local(p)
        if self.optimizer is not None:
            names = {p: clean_name(n) for n, p in self.module.named_parameters()}
            for p, st in self.optimizer.state.items():
                for k, v in st.items():
                    if torch.is_tensor(v) and v.is_floating_point():
                        yield f"{name}_optimizer.{names.get(p, '?')}.{k}", _local(v)
        if self.ema is not None:
            for n, v in self.ema.state_dict().items():
                yield f"{name}_ema.{n}", _local(v)

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped in for the duration (the live ones when there is no EMA)."""
        if self.ema is not None:
            self.ema.swap()
        try:
            yield self.module
        finally:
            if self.ema is not None:
                self.ema.swap()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite(trainables: dict[str, Trainable], d: Dist) -> list[str]:
    """Names of the checkpointed tensors (weights, optimizer state, EMA) holding a NaN or
    inf on any rank. One host sync; run at log steps and before every checkpoint."""
    names, flags = [], []
    for name, t in trainables.items():
        for n, v in t.tensors(name):
            names.append(n)
            flags.append(torch.isfinite(v.detach()).all() if v.numel() else torch.ones((), dtype=torch.bool,
                                                                                        device=v.device))
    if not names:
        return []
    ok = torch.stack([f.to(d.device) for f in flags]).to(torch.int32)
    if d.world_size > 1:
        import torch.distributed as dist

        ok = ok.to(d.device if d.device.type == "cuda" else "cpu")
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return [n for n, good in zip(names, ok.tolist()) if not good]


# ---------------------------------------------------------------- building models


def init_source(src: str) -> tuple[str, bool]:
    """(path to record, is a k2train checkpoint): a run or checkpoints/ folder is pinned to
    its newest complete checkpoint, so a later stage always names the exact weights it started from."""
    step_dir = resolve_checkpoint(src)
    return (os.path.abspath(step_dir), True) if step_dir else (os.path.abspath(src), False)


def load_init_weights(model: K2DiT, src: str, which: str) -> dict:
    """Copies the weights of `src` (k2train run/checkpoint, full or LoRA; diffusers folder or
    release file) into `model`; parameters `src` lacks (model.aux extras) keep their values."""
    from trainer.weights import load_weights

    path, ours = init_source(src)
    loaded = load_weights(path, which, model_cfg=model.cfg)
    model.load_state_dict(loaded.state_dict(), strict=False)
    log.info("initialised from %s%s", path, f" ({which} weights)" if ours else "")
    return {"source": path, "weights": which if ours else None}


def build_dit(cfg: TrainConfig, d: Dist, *, model_cfg: ModelConfig | None = None, init_from: str | None = None,
              init_weights: str = "ema", trainable: bool = True, lora=None, attach=None) -> tuple[nn.Module, dict]:
    """A DiT ready to train (or to run frozen), and its models.json entry.

    Order: random init → `attach(model)` (trainable extras in model.aux) → init weights →
    LoRA adapters (after the base is loaded, so the base really is the checkpoint's) →
    device → AC/compile (trainable only) and FSDP2. Frozen models get no grads.
    """
    model_cfg = model_cfg or cfg.model
    model = K2DiT(model_cfg)
    model.init_weights(cfg.seed)
    if attach is not None:
        attach(model)
    base = load_init_weights(model, init_from, init_weights) if init_from else None
    use_lora = trainable and lora is not None and lora.rank > 0
    if use_lora:
        apply_lora(model, lora)
    if not trainable:
        model.requires_grad_(False)
    model.to(d.device)
    if cfg.parallel.compile and d.device.type == "cuda":
        # FlexAttention under the text mask: traced into each compiled block, faster than the
        # dense masked kernel there (trainer/model/attention.py); uncompiled models keep it dense.
        model.attention = "flex"
    if cfg.parallel.float8 and trainable and d.device.type != "cuda":
        raise ValueError(f"parallel.float8=true needs a CUDA device (float8 GEMMs); this run is on {d.device}")
    model = parallelize(model, cfg.parallel if trainable else replace(cfg.parallel, activation_checkpoint="none"), d,
                        float8=cfg.parallel.float8 and trainable)
    info = {
        "config": asdict(model_cfg),
        "lora": {"rank": lora.rank, "alpha": alpha_of(lora), "targets": list(lora.targets),
                 "text_fusion": lora.text_fusion} if use_lora else None,
        "base": base,
        "frozen": not trainable,
    }
    return model, info


# ---------------------------------------------------------------- one optimizer step


def autocast(cfg: TrainConfig, d: Dist):
    """FSDP casts parameters itself; a single unsharded process needs autocast for bf16."""
    if d.mesh is None and cfg.parallel.param_dtype == "bfloat16":
        return torch.autocast(d.device.type, dtype=DTYPES["bfloat16"])
    return contextlib.nullcontext()


def accumulate(cfg: TrainConfig, d: Dist, loader, loss_fn, models: list[nn.Module]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """Runs the step's micro-batches: loss_fn(batch) -> (loss, terms) is backpropagated at
    1/accum; gradients are reduced across ranks on the last micro-batch only. Returns the
    mean loss and terms (on the device: no host sync) and the seconds spent waiting for data."""
    accum = cfg.accumulation(d.world_size)
    loss_sum = torch.zeros((), device=d.device)
    terms_mean: dict[str, torch.Tensor] = {}
    data_s = 0.0
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next(loader).to(d.device, non_blocking=True)
        data_s += time.perf_counter() - t0
        for m in models:
            set_gradient_sync(m, micro == accum - 1)
        with autocast(cfg, d):
            loss, terms = loss_fn(batch)
        (loss / accum).backward()
        loss_sum += loss.detach()
        for k, v in terms.items():
            terms_mean[k] = terms_mean.get(k, 0.0) + v.detach() / accum
    return loss_sum / accum, terms_mean, data_s


def update(t: Trainable, grad_clip: float, step: int, name: str = "model") -> tuple[torch.Tensor, bool | torch.Tensor]:
    """Clips, steps and updates the EMA, unless the gradient norm is not finite (then the
    update is skipped and the caller counts it). Returns (grad norm, applied).

    With a fused optimizer (CUDA) the skip is decided on the device and `applied` is a
    0-dim bool tensor: the step never waits for the GPU, and the loop reads the flag at
    its log cadence. Elsewhere `applied` is a bool and a skip is logged at once."""
    grad_norm = clip_grad_norm([p for p in t.module.parameters() if p.requires_grad], grad_clip)
    if skips_on_device(t.optimizer):
        applied = torch.isfinite(grad_norm)
        step_unless(t.optimizer, ~applied)
        if t.ema is not None:
            t.ema.update(applied)
        t.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied
    finite = math.isfinite(grad_norm.item())
    if finite:
        t.optimizer.step()
        if t.ema is not None:
            t.ema.update()
    else:
        log.warning("step %d: non-finite gradient norm of %s, update skipped", step, name)
    t.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def skipped(applied: bool | torch.Tensor) -> bool | torch.Tensor:
    """The `skipped` value of a stage's step metrics from `update`'s `applied` (a device
    flag stays on the device)."""
    return ~applied if torch.is_tensor(applied) else not applied


# ---------------------------------------------------------------- the stage interface


class Stage:
    """Base class; see the module docstring. Subclasses set `self.trainables` in __init__."""

    trainables: dict[str, Trainable]
    # Which trainable samples, evaluates and exports.
    main = "model"

    def __init__(self, cfg: TrainConfig, d: Dist, data: ShapesData, resume_dir: str | None):
        self.cfg, self.d, self.data, self.resume_dir = cfg, d, data, resume_dir
        self.trainables = {}
        self.frozen: dict[str, dict] = {}  # name -> models.json entry of a frozen model (its source)

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        """Checks of the stage's settings that need more than types; ValueError naming the key.
        Runs with the rest of the config before any work starts (also in slurm.submit)."""
        validate_schedule(cfg.optimizer)

    def nonfinite(self) -> list[str]:
        """Checkpointed tensors with a NaN or inf (see `nonfinite`)."""
        return nonfinite(self.trainables, self.d)

    def models_info(self) -> dict[str, dict]:
        return {**{n: t.info for n, t in self.trainables.items()}, **self.frozen}

    def step(self, step: int) -> dict:
        raise NotImplementedError

    def sampling(self):
        return self.trainables[self.main].ema_weights()

    def sampler(self):
        """How the loop's sample grids are drawn (trainer.sample.Sampler: steps, guidance, mu)."""
        from trainer.sample import Sampler

        return Sampler(self.cfg.log.sample_steps, self.cfg.log.sample_guidance, self.cfg.stage.flow.mu)

    def validate(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        pass

    def early_stop(self, values: dict) -> str | None:
        """After each step, with its logged values: a reason to end the run now (it
        checkpoints and finishes with status "stopped"), or None to go on."""
        return None

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.stage.steps, self.cfg.optimizer)
        for t in self.trainables.values():
            set_lr(t.optimizer, lr)
        return lr


class FlowStage(Stage):
    """Flow matching (pretraining, midtraining, SFT): one DiT, full weights or LoRA,
    loss from `stage.objective`, optional held-out validation loss."""

    def __init__(self, cfg: TrainConfig, d: Dist, data: ShapesData, resume_dir: str | None):
        super().__init__(cfg, d, data, resume_dir)
        s = cfg.stage
        self.objective = build_objective(s, cfg.model, cfg.seed)
        lora = s.lora if s.lora.rank > 0 else None
        init_from, which = cfg.checkpoint.init_from, cfg.checkpoint.init_weights
        if resume_dir is not None:
            # Full weights come from the checkpoint. A LoRA checkpoint holds only adapters: its
            # base is the one recorded when it was trained, not whatever init_from says now.
            from trainer.checkpoint import read_models

            recorded = (read_models(resume_dir).get("model") or {}).get("base")
            if lora is None:
                init_from = None
            elif recorded:
                init_from, which = recorded["source"], recorded["weights"] or "ema"
        model, info = build_dit(cfg, d, init_from=init_from, init_weights=which, lora=lora,
                                attach=self.objective.attach)
        self.model = model
        self.trainables["model"] = Trainable.create(model, cfg, info)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters, %.2fM trained%s", cfg.model.name, n_all / 1e6, n_train / 1e6,
                 f" (LoRA rank {lora.rank})" if lora else "")
        self.val = None
        if s.validation.path and s.validation.every > 0:
            self.val = ValidationSet(cfg, d)

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        super().validate_config(cfg)
        s = cfg.stage
        if s.objective not in OBJECTIVES:
            raise ValueError(f"stage.objective={s.objective!r} is not one of {sorted(OBJECTIVES)}")
        if s.objective == "flow_repa":
            validate_repa(s.repa, cfg.model.num_blocks)
        validate_lora(s.lora)
        if s.lora.rank > 0 and not cfg.checkpoint.init_from:
            raise ValueError("stage.lora.rank > 0 needs checkpoint.init_from: a LoRA adapts pretrained weights "
                             "(a k2train run or checkpoint, a diffusers folder or a release file)")
        v = s.validation
        if v.every < 0 or v.samples <= 0 or v.batch_size <= 0:
            raise ValueError(f"stage.validation: every >= 0, samples > 0 and batch_size > 0 "
                             f"(got {v.every}, {v.samples}, {v.batch_size})")
        if v.every > 0 and not v.path:
            raise ValueError("stage.validation.every > 0 needs stage.validation.path (a held-out shard directory)")
        if s.max_nonfinite_steps < 0:
            raise ValueError(f"stage.max_nonfinite_steps must be >= 0, got {s.max_nonfinite_steps}")

    def step(self, step: int) -> dict:
        cfg = self.cfg
        lr = self.set_lr(step)
        self.objective.set_step(step)
        main = self.trainables["model"]
        loss, terms, data_s = accumulate(cfg, self.d, self.data.loader,
                                         lambda batch: self.objective.loss(self.model, batch), [self.model])
        grad_norm, applied = update(main, cfg.optimizer.grad_clip, step)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "data_s": data_s, "skipped": skipped(applied), **terms}

    def validate(self, step: int) -> dict[str, float]:
        if self.val is None or step % self.cfg.stage.validation.every:
            return {}
        with autocast(self.cfg, self.d):
            return {"val_loss": self.val.loss(self.model)}


class ValidationSet:
    """About `samples` samples of a held-out shard set — the first batches of its epoch-0
    plan, the same every time — each with noise and a timestep fixed by its sample id (a
    stream of its own): the same weights give the same loss, so values from different steps
    compare."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        from data.shard_loader import ShardLoader

        v = cfg.stage.validation
        if not os.path.isdir(v.path):
            raise ValueError(f"stage.validation.path={v.path!r} is not a shard directory")
        per_rank = max(1, v.batch_size // d.world_size)
        self.loader = ShardLoader(v.path, per_rank, d.rank, d.world_size, seed=cfg.data.seed, caption_dropout=0.0,
                                  text_len=cfg.data.text_len, num_workers=0)
        self.num_batches = max(1, math.ceil(v.samples / (per_rank * d.world_size)))
        # A seed no training stream uses: validation noise is not the training noise.
        self.objective = FlowObjective(cfg.stage, cfg.model, seed=cfg.seed + 7919)
        self.d = d

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        self.loader.load_state_dict({**self.loader.state_dict(), "epoch": 0, "batches_yielded": 0})
        was_training = model.training
        model.eval()
        total = torch.zeros((), device=self.d.device)
        count = torch.zeros((), device=self.d.device)
        for _ in range(self.num_batches):
            batch = next(self.loader).to(self.d.device)
            loss, _ = self.objective.loss(model, batch)
            n = batch.latents.shape[0]
            total += loss.detach().float() * n
            count += n
        model.train(was_training)
        total, count = self.d.all_reduce_mean(total), self.d.all_reduce_mean(count)
        return float(total / count)


STAGES: dict[str, type[Stage]] = {"flow": FlowStage}
# Stages of the later recipe, imported when named.
NAMED_STAGES = {"grpo": "rl.grpo:GRPOStage", "dpo": "rl.dpo:DPOStage", "tdm": "distill.tdm:TDMStage"}


def stage_class(kind: str) -> type[Stage]:
    if kind in STAGES:
        return STAGES[kind]
    kind = NAMED_STAGES.get(kind, kind)
    if ":" in kind:
        module, _, name = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"stage.kind={kind!r}: cannot import {name} from {module} ({e})") from e
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ValueError(f"stage.kind={kind!r} is not a trainer.stage.Stage subclass")
        return cls
    raise ValueError(f"stage.kind={kind!r} is not one of {sorted([*STAGES, *NAMED_STAGES])} or "
                     f"'package.module:Class'")


def validate_stage(cfg: TrainConfig) -> None:
    stage_class(cfg.stage.kind).validate_config(cfg)


def build_stage(cfg: TrainConfig, d: Dist, data: ShapesData, resume_dir: str | None) -> Stage:
    return stage_class(cfg.stage.kind)(cfg, d, data, resume_dir)
