"""Typed schemas for the Hydra config tree in configs/.

The root `TrainConfig` is registered as Hydra's schema, so every YAML file and
command-line override is merged into these dataclasses: an unknown key or a
value of the wrong type fails before any work starts, naming the key. After
composition the config is turned into these objects once, at the edge
(`trainer/train.py`), and passed down typed.
"""

import os
from dataclasses import dataclass, field

from data.config import DataConfig
from trainer.flow import FlowConfig
from trainer.model.config import ModelConfig
from trainer.repa import RepaConfig


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the DiT's linears; rank 0 trains the full weights.

    Applied after the base weights are loaded (checkpoint.init_from), before
    sharding; only the adapters are optimised, averaged and checkpointed."""

    rank: int = 0
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    # Module-name suffixes inside the DiT blocks (K2DiT names; see trainer/lora.py).
    targets: list[str] = field(default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.out"])
    # Also adapt the text-fusion blocks' linears (off: the text path of a release rarely needs it).
    text_fusion: bool = False


@dataclass
class ValidationConfig:
    """A held-out validation loss with fixed samples, noise and timesteps (comparable across steps)."""

    path: str | None = None  # a shard directory (data/writer.py); None: no validation
    every: int = 0  # steps between validation passes; 0: never
    samples: int = 64  # the first N samples of the set, in index order
    batch_size: int = 16


@dataclass
class StageConfig:
    # `kind` picks the Stage class (trainer/stage.py): "flow" (pretrain, midtrain, SFT)
    # or "package.module:Class" for a stage defined outside k2train. A flow stage's
    # loss is `objective` (trainer/objectives.py).
    name: str = "pretrain"
    kind: str = "flow"
    objective: str = "flow"
    steps: int = 1000
    global_batch_size: int = 32  # samples per optimizer step, all ranks together
    micro_batch_size: int = 32  # samples per rank per forward; accumulation fills the rest
    ema_decay: float = 0.999  # 0 disables EMA
    flow: FlowConfig = field(default_factory=FlowConfig)
    # iREPA representation alignment; read only by objective flow_repa.
    repa: RepaConfig = field(default_factory=RepaConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # A run stops with status "failed" after this many non-finite steps in a row (0: never).
    max_nonfinite_steps: int = 5


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_steps: int = 100
    # After warmup: "cosine" to lr * min_lr_ratio at the last step; "constant"; or "wsd"
    # (warmup-stable-decay: constant, then linear to lr * min_lr_ratio over the last
    # decay_fraction of the steps).
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2


@dataclass
class ParallelConfig:
    # Data-parallel mesh: dp_replicate x dp_shard = world size; -1 takes what the
    # other leaves. dp_replicate > 1 gives HSDP (replicate across, shard within).
    dp_replicate: int = 1
    dp_shard: int = -1
    param_dtype: str = "float32"  # compute dtype of the parameters (bfloat16 on GPUs)
    reduce_dtype: str = "float32"  # gradient reduction dtype
    activation_checkpoint: str = "none"  # none | full (per block)
    compile: bool = False  # torch.compile each block
    backend: str = "auto"  # auto | nccl | gloo


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; the last step always saves
    keep: int = 3  # keep the newest k complete checkpoints
    async_save: bool = False
    # When the run has no checkpoint of its own yet, start from: a k2train run or
    # checkpoint folder (the previous stage) or released weights (a diffusers
    # folder or a release .safetensors file).
    init_from: str | None = None
    init_weights: str = "ema"  # from a k2train checkpoint: "ema" or "model" (live) weights
    # Signals that mean "the nodes are going away": finish the step, checkpoint, exit 0
    # with status.json saying "preempted" (slurm/train.sbatch then requeues the job).
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines / metrics rows
    tensorboard: bool = True
    sample_every: int = 0  # steps between sample grids; 0 disables
    sample_steps: int = 24
    sample_guidance: float = 3.5
    num_samples: int = 8
    # Prompts of the sample grids; empty: the data world's held-out prompts. Grids need a
    # text encoder (data.encoder_path for shards) and prompts from here or the world.
    sample_prompts: list[str] = field(default_factory=list)
    peak_tflops: float | None = None  # per device; None: looked up from the device name
    # Weights & Biases beside TensorBoard. The W&B run id is the run name, so a requeued
    # job continues the same W&B run; "offline" needs no network (wandb sync later).
    wandb: bool = False
    wandb_project: str = "k2train"
    wandb_entity: str | None = None
    wandb_mode: str = "offline"  # offline | online | disabled


@dataclass
class LauncherConfig:
    """How `python -m slurm.submit` renders slurm/train.sbatch; the trainer ignores it.
    Nodes and processes per node are written once here and read back from the
    allocation on the nodes (SLURM_NNODES, SLURM_GPUS_ON_NODE)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job
    procs_per_node: int = 0  # trainer processes per node; 0: gpus_per_node (1 without GPUs)
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "0" (all of the node's memory) or "200G"
    time: str | None = None  # e.g. "2-00:00:00"; the job requeues itself before it
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None  # default: the run name
    # The warning before the time limit: the trainer checkpoints and the job requeues.
    warning_signal: str = "USR1"
    warning_seconds: int = 300
    # Requeues after a crash or a lost node before giving up (preemptions do not count).
    max_failures: int = 3
    python: str | None = None  # interpreter on the nodes; default: the one that submits
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load ..., source ...)
    sbatch: list[str] = field(default_factory=list)  # extra sbatch flags, e.g. "--exclusive"
    rdzv_port: int | None = None  # default: 29500 + job id mod 10000

    @property
    def world_size(self) -> int:
        return self.nodes * (self.procs_per_node or self.gpus_per_node or 1)


@dataclass
class TrainConfig:
    # The run directory is run_root/name; a resubmitted job with the same name
    # (or Slurm job id, the default) finds its checkpoints there.
    name: str = "default"
    run_root: str = "runs"
    seed: int = 0
    # Bitwise-reproducible kernels; with a fixed thread count a resumed CPU run
    # matches an uninterrupted one exactly.
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run_root, self.name)

    def validate(self, world_size: int) -> None:
        """Checks that need more than types; raises ValueError naming the key."""
        self.model.validate()
        s = self.stage
        if s.steps <= 0:
            raise ValueError(f"stage.steps must be positive, got {s.steps}")
        per_step = s.micro_batch_size * world_size
        if s.global_batch_size % per_step:
            raise ValueError(
                f"stage.global_batch_size={s.global_batch_size} must be a multiple of "
                f"stage.micro_batch_size x world size = {s.micro_batch_size} x {world_size}"
            )
        if not 0 <= s.ema_decay < 1:
            raise ValueError(f"stage.ema_decay must be in [0, 1), got {s.ema_decay}")
        if self.parallel.activation_checkpoint not in ("none", "full"):
            raise ValueError(f"parallel.activation_checkpoint must be none|full, got {self.parallel.activation_checkpoint!r}")
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self.parallel, key) not in ("float32", "bfloat16"):
                raise ValueError(f"parallel.{key} must be float32|bfloat16, got {getattr(self.parallel, key)!r}")
        if self.checkpoint.every <= 0 or self.checkpoint.keep <= 0:
            raise ValueError("checkpoint.every and checkpoint.keep must be positive")
        if self.checkpoint.init_weights not in ("ema", "model"):
            raise ValueError(f"checkpoint.init_weights must be ema|model, got {self.checkpoint.init_weights!r}")
        if self.log.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"log.wandb_mode must be offline|online|disabled, got {self.log.wandb_mode!r}")
        # The stage's own settings (its class knows them), before any work starts.
        from trainer.stage import validate_stage

        validate_stage(self)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.stage.global_batch_size // (self.stage.micro_batch_size * world_size)
