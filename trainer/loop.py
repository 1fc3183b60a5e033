"""The training loop. Stages plug in an objective (trainer/objectives.py); the
loop itself is shared by every stage."""

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image

from data.shapes_loader import ShapesData
from data.sources import build_data
from trainer.checkpoint import Checkpointer, TrainState, load_model_weights, resolve_checkpoint
from trainer.config import TrainConfig
from trainer.metrics import MetricsLogger
from trainer.model import K2DiT, flops_per_sample, load_pretrained
from trainer.objectives import Objective, build_objective
from trainer.optim import EMA, build_optimizer, lr_at, set_lr
from trainer.parallel import DTYPES, Dist, init_distributed, parallelize, set_gradient_sync
from trainer.preemption import Preemption, write_status
from trainer.sample import generate, grid_image
from trainer.titan import clip_grad_norm, peak_flops

log = logging.getLogger("k2train")


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: TrainConfig
    d: Dist
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    objective: Objective
    data: ShapesData  # (loader, encoder, latents, world)
    ckpt: Checkpointer
    state: TrainState
    metrics: MetricsLogger


def setup_logging(run_dir: str, is_main: bool) -> None:
    logger = logging.getLogger()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handlers = [logging.StreamHandler()]
    if is_main:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)


def init_weights_from(model: K2DiT, cfg: TrainConfig) -> None:
    """A new run's starting weights: a k2train run/checkpoint (the previous stage,
    its EMA by default) or released weights (diffusers folder or release file)."""
    src = cfg.checkpoint.init_from
    if resolve_checkpoint(src) is not None:
        used = load_model_weights(model, src, cfg.checkpoint.init_weights)
    else:
        model.load_state_dict(load_pretrained(src, cfg.model).state_dict(), strict=False)
        used = src
    log.info("initialised from %s", used)


def setup(cfg: TrainConfig) -> Run:
    d = init_distributed(cfg.parallel, cfg.device)
    cfg.validate(d.world_size)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    os.makedirs(cfg.run_dir, exist_ok=True)
    setup_logging(cfg.run_dir, d.is_main)
    torch.manual_seed(cfg.seed)

    def build():
        assets = os.path.join(cfg.run_dir, "assets")
        return build_data(cfg.data, assets, cfg.stage.micro_batch_size, d.rank, d.world_size, d.device,
                          cfg.model.text_dim)

    # Rank 0 builds any missing assets (the tiny text encoder) before the others read them.
    data = build() if d.is_main else None
    d.barrier()
    data = data or build()
    if data.latents.channels != cfg.model.latent_channels:
        raise ValueError(
            f"model.latent_channels={cfg.model.latent_channels} but data {cfg.data.name!r} yields "
            f"{data.latents.channels}-channel latents"
        )

    model = K2DiT(cfg.model)
    model.init_weights(cfg.seed)
    log.info("model %s: %.2fM parameters; world size %d on %s", cfg.model.name, model.num_params() / 1e6,
             d.world_size, d.device)
    ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint, d)
    objective = build_objective(cfg.stage, cfg.model, cfg.seed)
    objective.attach(model)  # trainable extras live in model.aux: sharded, optimised, checkpointed
    if cfg.checkpoint.init_from and ckpt.latest() is None:
        init_weights_from(model, cfg)
    model.to(d.device)
    model = parallelize(model, cfg.parallel, d)
    optimizer = build_optimizer(model, cfg.optimizer)
    ema = EMA(model, cfg.stage.ema_decay) if cfg.stage.ema_decay > 0 else None

    state = TrainState(world_size=d.world_size)
    latest = ckpt.latest()
    if latest is not None:
        extras = {"objective": objective.state_dict}
        if ema is not None:
            extras["ema"] = ema.state_dict
        state, loaded = ckpt.load(latest, model, optimizer, extras)
        if ema is not None:
            ema.load_state_dict(loaded["ema"])
        objective.load_state_dict(loaded["objective"])
        data.loader.load_state_dict(state.loader)
        state.world_size = d.world_size

    tokens = cfg.data.text_len + (cfg.data.image_size // data.latents.downsample // cfg.model.patch_size) ** 2
    metrics = MetricsLogger(
        cfg.run_dir,
        d.is_main,
        state.step,
        cfg.stage.steps,
        flops_per_sample(cfg.model, cfg.data.text_len, tokens - cfg.data.text_len),
        tokens,
        cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops else peak_flops(d.device),
        d.world_size,
        d.device,
        cfg.log.tensorboard,
    )
    return Run(cfg, d, model, optimizer, ema, objective, data, ckpt, state, metrics)


def autocast(run: Run):
    """FSDP casts parameters itself; a single unsharded process needs autocast for bf16."""
    if run.d.mesh is None and run.cfg.parallel.param_dtype == "bfloat16":
        return torch.autocast(run.d.device.type, dtype=DTYPES["bfloat16"])
    return contextlib.nullcontext()


def train_step(run: Run) -> dict[str, float]:
    cfg, model, opt = run.cfg, run.model, run.optimizer
    accum = cfg.accumulation(run.d.world_size)
    set_lr(opt, lr_at(run.state.step, cfg.stage.steps, cfg.optimizer))
    run.objective.set_step(run.state.step)
    loss_sum = torch.zeros((), device=run.d.device)
    extra: dict[str, torch.Tensor] = {}
    data_s = 0.0
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next(run.data.loader).to(run.d.device, non_blocking=True)
        data_s += time.perf_counter() - t0
        set_gradient_sync(model, micro == accum - 1)
        with autocast(run):
            loss, terms = run.objective.loss(model, batch)
        (loss / accum).backward()
        loss_sum += loss.detach()
        for k, v in terms.items():  # kept on the device: no host sync per micro-batch
            extra[k] = extra.get(k, 0.0) + v.detach() / accum
    grad_norm = clip_grad_norm(model.parameters(), cfg.optimizer.grad_clip)
    if math.isfinite(grad_norm.item()):
        opt.step()
        if run.ema is not None:
            run.ema.update()
    else:
        log.warning("step %d: non-finite gradient norm, update skipped", run.state.step)
    opt.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.samples_seen += cfg.stage.global_batch_size
    return {"loss": loss_sum / accum, "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"], "data_s": data_s, **extra}


def can_sample(run: Run) -> bool:
    """Sample grids need a text encoder and prompts (log.sample_prompts or the data world's)."""
    data = run.data
    return (data.encoder is not None and hasattr(data.latents, "decode")
            and bool(run.cfg.log.sample_prompts or data.world is not None))


def save_samples(run: Run) -> None:
    cfg, data = run.cfg, run.data
    prompts = list(cfg.log.sample_prompts or data.world.held_out_prompts())[: cfg.log.num_samples]
    seeds = list(range(len(prompts)))
    side = cfg.data.image_size // data.latents.downsample
    if run.ema is not None:
        run.ema.swap()
    try:
        images = generate(
            run.model, data.encoder.encode, data.latents.decode, prompts, seeds, cfg.model, (side, side),
            cfg.log.sample_steps, cfg.log.sample_guidance, run.d.device,
        )
    finally:
        if run.ema is not None:
            run.ema.swap()
    if run.d.is_main:
        grid = grid_image(images, prompts)
        folder = os.path.join(cfg.run_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(folder, f"step_{run.state.step:08d}.png"))
        run.metrics.image("samples", grid, run.state.step)


def save_checkpoint(run: Run) -> None:
    run.state.loader = run.data.loader.state_dict()
    extras = {"objective": run.objective.state_dict()}
    if run.ema is not None:
        extras["ema"] = run.ema.state_dict()
    run.ckpt.save(run.state, run.model, run.optimizer, extras)


def train(cfg: TrainConfig) -> Run:
    # Handlers first: a warning that comes while a large model loads stops the run after its first step.
    preemption = Preemption(cfg.checkpoint.preempt_signals)
    try:
        run = setup(cfg)
    except BaseException:
        preemption.restore()
        raise
    st, steps = run.state, cfg.stage.steps
    if cfg.log.sample_every and not can_sample(run):
        log.warning("log.sample_every=%d but no sample grids: they need a text encoder (data.encoder_path), a "
                    "latent decoder (data.vae_path) and prompts (log.sample_prompts or data.world)", cfg.log.sample_every)
    if st.step >= steps:
        log.info("run %s already finished at step %d", cfg.run_dir, st.step)
    status = (lambda state: write_status(cfg.run_dir, state, st.step)) if run.d.is_main else (lambda state: None)
    status("running")
    try:
        while st.step < steps:
            values = train_step(run)
            run.metrics.count(cfg.stage.global_batch_size, values.pop("data_s"))
            if st.step % cfg.log.every == 0 or st.step == steps:
                # loss and objective terms are per rank; grad_norm is already global
                values = {k: run.d.all_reduce_mean(v) if torch.is_tensor(v) and k != "grad_norm" else v
                          for k, v in values.items()}
                run.metrics.log(st.step, {k: float(v) for k, v in values.items()})
            stop = preemption.check(run.d)
            if cfg.log.sample_every and can_sample(run) and (st.step % cfg.log.sample_every == 0 or st.step == steps):
                save_samples(run)
            if st.step % cfg.checkpoint.every == 0 or st.step == steps or stop:
                save_checkpoint(run)
            run.ckpt.poll()
            if stop:
                log.warning("preempted: checkpoint of step %d saved, exiting for requeue", st.step)
                break
        run.ckpt.wait()
    except BaseException:
        status("failed")
        raise
    finally:
        preemption.restore()
    status("finished" if st.step >= steps else "preempted")
    run.metrics.close()
    return run
