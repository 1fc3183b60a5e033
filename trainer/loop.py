"""The training loop: it keeps time. The stage (trainer/stage.py) owns the models,
optimizers and EMAs and computes each optimizer step; the loop counts steps, stops
on preemption or a run of non-finite steps, and keeps the checkpoint, sample,
validation and logging cadence."""

import logging
import os
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from PIL import Image

from data.shapes_loader import ShapesData
from data.sources import build_data
from trainer.checkpoint import CheckpointError, Checkpointer, TrainState
from trainer.config import TrainConfig
from trainer.metrics import MetricsLogger
from trainer.model import flops_per_sample
from trainer.parallel import Dist, init_distributed
from trainer.preemption import Preemption, write_status
from trainer.sample import generate, grid_image
from trainer.stage import Stage, build_stage
from trainer.titan import peak_flops

log = logging.getLogger("k2train")


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: TrainConfig
    d: Dist
    stage: Stage
    data: ShapesData  # (loader, encoder, latents, world)
    ckpt: Checkpointer
    state: TrainState
    metrics: MetricsLogger


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite gradient norm, or the weights,
    optimizer state or EMA hold a NaN or inf."""


class SkippedSteps:
    """Optimizer steps in a row whose update was skipped (non-finite gradient norm).

    A stage reports each step's skip as a bool, or as a 0-dim device tensor when the
    optimizer decided it on the GPU (trainer/stage.py's `update`): then the run is counted
    on the device and read only at log and checkpoint steps, so a step costs no host
    sync. `longest` is the longest run since the previous read."""

    def __init__(self):
        self.run = 0  # int, or a device tensor once a flag arrived
        self.longest = 0
        self.on_device = False

    def add(self, skipped) -> None:
        if torch.is_tensor(skipped):
            self.on_device = True
            self.run = (self.run + 1) * skipped.to(torch.int64)
            self.longest = torch.maximum(torch.as_tensor(self.longest, device=skipped.device), self.run)
        else:
            self.run = (self.run + 1) * bool(skipped)
            self.longest = max(self.longest, self.run)

    def known(self) -> int:
        """The current run where it needs no sync (host flags), else 0."""
        return 0 if self.on_device else self.run

    def read(self) -> tuple[int, int]:
        """(current run, longest run since the last read); a host sync for device flags."""
        run, longest = int(self.run), int(self.longest)
        self.longest = self.run
        return run, longest


def check_finite(run: Run) -> None:
    """Stops the run before a non-finite state is checkpointed or trained on further."""
    bad = run.stage.nonfinite()
    if bad:
        last = run.ckpt.latest()
        raise NonFiniteError(
            f"step {run.state.step}: non-finite values in {len(bad)} tensors, e.g. {', '.join(bad[:5])}; "
            f"this state is not checkpointed ({'the checkpoint of step %d is intact' % last if last else 'no checkpoint yet'}). "
            f"Try a lower optimizer.lr, more optimizer.warmup_steps, optimizer.grad_clip or optimizer.eps")


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


def setup(cfg: TrainConfig) -> Run:
    d = init_distributed(cfg.parallel, cfg.device)
    cfg.validate(d.world_size)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    os.makedirs(cfg.run_dir, exist_ok=True)
    setup_logging(cfg.run_dir, d.is_main)
    resolved = OmegaConf.structured(cfg)
    log.info("run %s, resolved config:\n%s", cfg.run_dir, OmegaConf.to_yaml(resolved).rstrip())
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

    ckpt = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint, d)
    stage, state = resume(cfg, d, data, ckpt)
    log.info("stage %s (%s) on world size %d, %s", cfg.stage.name, cfg.stage.kind, d.world_size, d.device)

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
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        wandb_entity=cfg.log.wandb_entity,
        wandb_mode=cfg.log.wandb_mode,
        run_name=cfg.name,
        config=OmegaConf.to_container(resolved),
    )
    return Run(cfg, d, stage, data, ckpt, state, metrics)


def resume(cfg: TrainConfig, d: Dist, data: ShapesData, ckpt: Checkpointer) -> tuple[Stage, TrainState]:
    """The stage, restored from the newest checkpoint that verifies and loads with finite
    values; each one that does not is named, set aside and the next older one tried."""
    while True:
        step = ckpt.newest_good()
        stage = build_stage(cfg, d, data, ckpt.path(step) if step is not None else None)
        if step is None:
            return stage, TrainState(world_size=d.world_size)
        problems = []
        try:
            state, loaded = ckpt.load(step, stage.trainables, {"stage": stage.state_dict})
            stage.load_state_dict(loaded["stage"])
            bad = stage.nonfinite()
            if bad:
                problems.append(f"non-finite values in {len(bad)} tensors: {', '.join(bad[:5])}")
        except CheckpointError as e:
            problems += e.problems
        every = d.all_objects(problems)
        problems = [p if d.world_size == 1 else f"rank {r}: {p}" for r, ps in enumerate(every) for p in ps]
        if not problems:
            data.loader.load_state_dict(state.loader)
            state.world_size = d.world_size
            return stage, state
        ckpt.set_aside(step, problems)


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
    sampler = run.stage.sampler()
    with run.stage.sampling() as model:
        images = generate(
            model, data.encoder.encode, data.latents.decode, prompts, seeds, cfg.model, (side, side),
            sampler.steps, sampler.guidance, run.d.device, mu=sampler.mu,
        )
    if run.d.is_main:
        grid = grid_image(images, prompts)
        folder = os.path.join(cfg.run_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(folder, f"step_{run.state.step:08d}.png"))
        run.metrics.image("samples", grid, run.state.step)


def save_checkpoint(run: Run) -> None:
    run.state.loader = run.data.loader.state_dict()
    run.ckpt.save(run.state, run.stage.trainables, {"stage": run.stage.state_dict()}, run.stage.models_info())


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
    skips = SkippedSteps()
    read_at = st.step  # the step of the last read of device skip flags
    early = None  # the stage's reason to stop before the last step
    skipped = []  # samples this rank's loader left out since the last metrics row
    pop_skipped = getattr(run.data.loader, "pop_skipped", list)
    try:
        while st.step < steps:
            values = run.stage.step(st.step)
            st.step += 1
            st.samples_seen += cfg.stage.global_batch_size
            run.metrics.count(cfg.stage.global_batch_size, values.pop("data_s"))
            skips.add(values.pop("skipped"))
            nonfinite = skips.known()
            values.update(run.stage.validate(st.step))
            skipped += pop_skipped()
            stop = preemption.check(run.d)
            early = run.stage.early_stop(values)
            save = st.step % cfg.checkpoint.every == 0 or st.step == steps or stop or early
            log_now = st.step % cfg.log.every == 0 or st.step == steps or "val_loss" in values or nonfinite
            limit = cfg.stage.max_nonfinite_steps
            if skips.on_device and (log_now or save):
                nonfinite, longest = skips.read()
                if longest:
                    log.warning("steps %d-%d: up to %d steps in a row had a non-finite gradient norm and were skipped",
                                read_at + 1, st.step, longest)
                if limit and longest >= limit > nonfinite:  # a run that ended between two reads
                    raise NonFiniteError(
                        f"step {st.step}: {longest} steps in a row within steps {read_at + 1}-{st.step} had a "
                        f"non-finite gradient norm and were skipped (stage.max_nonfinite_steps={limit}); try a lower "
                        f"optimizer.lr, more optimizer.warmup_steps or optimizer.grad_clip; the last checkpoint is "
                        f"intact")
                read_at = st.step
            if log_now:
                # loss and stage terms are per rank; grad norms are already global
                values = {k: run.d.all_reduce_mean(v) if torch.is_tensor(v) and not k.startswith("grad_norm") else v
                          for k, v in values.items()}
                every = [r for rank in run.d.all_objects(skipped) for r in rank] if run.d.world_size > 1 else skipped
                if every:
                    values["data_skipped"] = len(every)
                    run.metrics.skipped(st.step, every)
                skipped = []
                run.metrics.log(st.step, {k: float(v) for k, v in values.items()})
            if st.step % cfg.log.every == 0 or save:
                check_finite(run)
            if limit and nonfinite >= limit:
                raise NonFiniteError(
                    f"step {st.step}: {nonfinite} steps in a row (steps {st.step - nonfinite + 1}-{st.step}) had a "
                    f"non-finite gradient norm and were skipped; the weights are those of step {st.step - nonfinite}. "
                    f"Try a lower optimizer.lr, more optimizer.warmup_steps, optimizer.grad_clip, "
                    f"parallel.param_dtype=float32 to rule out bf16 overflow, or check the data near these steps "
                    f"(stage.max_nonfinite_steps={limit}); the last checkpoint is intact")
            if cfg.log.sample_every and can_sample(run) and (st.step % cfg.log.sample_every == 0 or st.step == steps):
                save_samples(run)
            if save:
                save_checkpoint(run)
            run.ckpt.poll()
            if stop:
                log.warning("preempted: checkpoint of step %d saved, exiting for requeue", st.step)
                break
            if early:
                log.warning("stopped early at step %d: %s (checkpoint saved)", st.step, early)
                break
        run.ckpt.wait()
    except BaseException as e:
        status("failed")
        if isinstance(e, NonFiniteError):
            log.error("failed: %s", e)
        raise
    finally:
        preemption.restore()
    status("finished" if st.step >= steps else "stopped" if early else "preempted")
    run.metrics.close()
    return run
