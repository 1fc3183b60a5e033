"""Typed schemas for the Hydra config tree in configs/.

The root `TrainConfig` is registered as Hydra's schema, so every YAML file and
command-line override is merged into these dataclasses: an unknown key or a
value of the wrong type fails before any work starts, naming the key. After
composition the config is turned into these objects once, at the edge
(`trainer/train.py`, which also refuses keys a `+` override added), and passed
down typed. Each dataclass's `validate` checks what types cannot (ranges, choices);
`TrainConfig.validate` runs them all.
"""

import os
import signal
from dataclasses import dataclass, field

from data.config import DataConfig
from distill.config import TDMConfig
from rl.config import DPOConfig, GRPOConfig
from trainer.flow import FlowConfig
from trainer.model.config import ModelConfig
from trainer.repa import RepaConfig

# Rules for `check`: (what the error message says the value must be, the test).
POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
UNIT_OPEN = ("in [0, 1)", lambda v: 0 <= v < 1)  # 1 would freeze an EMA, or drop every input
UNIT_CLOSED = ("in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION = ("in (0, 1]", lambda v: 0 < v <= 1)
MESH_SIZE = (">= 1 or -1", lambda v: v >= 1 or v == -1)  # -1: what the other dimension leaves


def one_of(*choices: str):
    return ("|".join(choices), lambda v: v in choices)


def optional(rule):
    return (f"null or {rule[0]}", lambda v: v is None or rule[1](v))


def check(prefix: str, obj, **rules) -> None:
    """ValueError naming the first field of `obj` that breaks its rule, e.g.
    `check("log", cfg.log, every=POSITIVE)` -> "log.every must be > 0, got 0"."""
    for key, (rule, ok) in rules.items():
        value = getattr(obj, key)
        if not ok(value):
            raise ValueError(f"{prefix + '.' if prefix else ''}{key} must be {rule}, got {value!r}")


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
    # `kind` picks the Stage class (trainer/stage.py): "flow" (pretrain, midtrain, SFT),
    # "grpo" (rl/grpo.py), "dpo" (rl/dpo.py), "tdm" (distill/tdm.py) or "package.module:Class" for a stage defined
    # outside k2train. A flow stage's
    # loss is `objective` (trainer/objectives.py).
    name: str = "pretrain"
    kind: str = "flow"
    objective: str = "flow"
    steps: int = 1000
    global_batch_size: int = 32  # samples per optimizer step, all ranks together
    micro_batch_size: int = 32  # samples per rank per forward; accumulation fills the rest
    ema_decay: float = 0.999  # 0 disables EMA
    # Dotted keys this stage cannot run without (e.g. data.weights for midtraining): a
    # run that leaves one null stops before it starts, naming it. (`???` in a stage
    # file cannot say this: a merge keeps the value an earlier config gave the key.)
    requires: list[str] = field(default_factory=list)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # iREPA representation alignment; read only by objective flow_repa.
    repa: RepaConfig = field(default_factory=RepaConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # The RL stages' settings; read only by stage.kind=grpo (rl/grpo.py) and dpo (rl/dpo.py).
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # The distillation stage's settings; read only by stage.kind=tdm (distill/tdm.py).
    tdm: TDMConfig = field(default_factory=TDMConfig)
    # A run stops with status "failed" after this many non-finite steps in a row (0: never).
    max_nonfinite_steps: int = 5

    def validate(self, world_size: int) -> None:
        check("stage", self, steps=POSITIVE, global_batch_size=POSITIVE, micro_batch_size=POSITIVE,
              ema_decay=UNIT_OPEN, max_nonfinite_steps=NON_NEGATIVE)
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"stage.global_batch_size={self.global_batch_size} must be a multiple of "
                f"stage.micro_batch_size x world size = {self.micro_batch_size} x {world_size}"
            )
        check("stage.flow", self.flow, logit_std=POSITIVE)
        check("stage.lora", self.lora, rank=NON_NEGATIVE, alpha=optional(POSITIVE), dropout=UNIT_OPEN)
        check("stage.validation", self.validation, every=NON_NEGATIVE, samples=POSITIVE, batch_size=POSITIVE)


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

    def validate(self) -> None:
        # The schedule names are trainer/optim.py's (validate_schedule, run with the stage).
        check("optimizer", self, name=one_of("adamw"), lr=POSITIVE, eps=POSITIVE, weight_decay=NON_NEGATIVE,
              grad_clip=NON_NEGATIVE, warmup_steps=NON_NEGATIVE, min_lr_ratio=UNIT_CLOSED, decay_fraction=FRACTION)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")


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
    # torchao float8 training (tensorwise scales) for the main blocks' linears of the
    # trained model; CUDA with float8 GEMMs (H100/H200). On 2b at 1024², 1.14x the bf16
    # step, windowed losses within 0.65% over 200 steps (docs/PERF_NOTES.md).
    float8: bool = False

    def validate(self, world_size: int) -> None:
        check("parallel", self, param_dtype=one_of("float32", "bfloat16"), reduce_dtype=one_of("float32", "bfloat16"),
              activation_checkpoint=one_of("none", "full"), backend=one_of("auto", "nccl", "gloo"))
        check("parallel", self, dp_replicate=MESH_SIZE, dp_shard=MESH_SIZE)
        # The mesh init_distributed will build, checked before a run directory exists.
        r, s = self.dp_replicate, self.dp_shard
        fixed = max(r, 1) * max(s, 1)
        if world_size % fixed or (r > 0 and s > 0 and fixed != world_size):
            raise ValueError(f"parallel.dp_replicate x parallel.dp_shard = {r} x {s} must fit world size {world_size}")


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

    def validate(self) -> None:
        check("log", self, every=POSITIVE, sample_every=NON_NEGATIVE, sample_steps=POSITIVE, num_samples=POSITIVE,
              peak_tflops=optional(POSITIVE), wandb_mode=one_of("offline", "online", "disabled"))


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

    def validate(self) -> None:
        check("launcher", self, nodes=POSITIVE, gpus_per_node=NON_NEGATIVE, procs_per_node=NON_NEGATIVE,
              cpus_per_task=optional(POSITIVE), warning_seconds=NON_NEGATIVE, max_failures=NON_NEGATIVE,
              rdzv_port=optional(("in [1, 65535]", lambda v: 1 <= v <= 65535)))


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
        check("", self, name=("non-empty", bool), device=one_of("auto", "cpu", "cuda"))
        self.model.validate()
        self.data.validate()
        self.stage.validate(world_size)
        self.optimizer.validate()
        self.parallel.validate(world_size)
        if self.parallel.float8 and self.device == "cpu":
            raise ValueError("parallel.float8=true needs device=cuda (float8 GEMMs): device=cpu was asked for")
        c = self.checkpoint
        check("checkpoint", c, every=POSITIVE, keep=POSITIVE, init_weights=one_of("ema", "model"))
        bad = [n for n in c.preempt_signals if not isinstance(getattr(signal, n, None), signal.Signals)]
        if bad:
            raise ValueError(f"checkpoint.preempt_signals must be signal names (e.g. SIGUSR1), got {bad}")
        self.log.validate()
        self.launcher.validate()
        # The stage's own settings (its class knows them), before any work starts.
        from trainer.stage import validate_stage

        validate_stage(self)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.stage.global_batch_size // (self.stage.micro_batch_size * world_size)
