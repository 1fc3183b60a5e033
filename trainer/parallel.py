"""Process group, device mesh and model parallelisation (FSDP2/HSDP, AC, compile).

One process on CPU, torchrun on CPU (gloo) and torchrun on GPUs (nccl) all go
through `init_distributed`. Sharding uses torch's own `fully_shard` (FSDP2):
each transformer block is its own unit, so its parameters are gathered just
before it runs and freed after, and the root unit holds the embeddings and
final layer.
"""

import atexit
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ParallelConfig

# F.linear on a 3D input returns a reshaped view, which FSDP2 flags in case the
# caller mutates it in place; the objectives only read the prediction.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # None when world_size == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
            if x.device.type != "cuda":  # gloo has no AVG
                x /= self.world_size
        return x

    def all_true(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        every = [None] * self.world_size
        dist.all_gather_object(every, obj)
        return every

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (a decision all ranks must share)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(cfg: ParallelConfig, device: str = "auto") -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return Dist(0, 1, 0, dev, None)

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        # Torn down before the interpreter's own teardown: a gloo group left to die with
        # the process aborted it now and then ("terminate called without an active
        # exception") after the run had finished and saved its checkpoint.
        atexit.register(_destroy_process_group)
    if cfg.dp_replicate > 0:
        replicate = cfg.dp_replicate
        shard = cfg.dp_shard if cfg.dp_shard > 0 else world_size // replicate
    else:  # replicate over whatever the shard groups leave
        shard = cfg.dp_shard if cfg.dp_shard > 0 else world_size
        replicate = world_size // shard
    if replicate * shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate x parallel.dp_shard = {replicate} x {shard} does not match world size {world_size}"
        )
    if replicate > 1:
        mesh = init_device_mesh(dev.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(dev.type, (shard,), mesh_dim_names=("dp_shard",))
    return Dist(rank, world_size, local_rank, dev, mesh)


def shardable_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of the DiT: each becomes one FSDP unit / AC region / compiled graph."""
    return [model.text_fusion.layerwise, model.text_fusion.refiner, model.blocks]


def float8_linears(module: nn.Module) -> nn.Module:
    """Swaps the module's linears for torchao's float8 training linears (tensorwise
    scaling: e4m3 forward, e5m2 gradients, scales from each tensor's amax every call).
    Linears whose sides are not multiples of 16 (the float8 GEMM's alignment) stay bf16."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def eligible(m: nn.Module, fqn: str) -> bool:
        return isinstance(m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0

    return convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                      module_filter_fn=eligible)


def parallelize(model: nn.Module, cfg: ParallelConfig, d: Dist, float8: bool = False) -> nn.Module:
    """Applies, in this order: float8 linears (main blocks, when asked), activation
    checkpointing, per-block compile, FSDP2.

    The order matters: AC wraps the block so compile traces the recomputation
    boundary too, and fully_shard must see the final module objects.
    """
    if float8:
        for block in model.blocks:
            float8_linears(block)
    for blocks in shardable_blocks(model):
        for i, block in enumerate(blocks):
            # A block with nothing to train (frozen text fusion under LoRA, a frozen model)
            # keeps no activations for backward, so checkpointing it would only cost time.
            trains = any(p.requires_grad for p in block.parameters())
            if cfg.activation_checkpoint == "full" and trains:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                # The recomputation must draw the same dropout masks as the forward (LoRA
                # dropout); blocks without dropout skip the RNG bookkeeping.
                dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules())
                block = checkpoint_wrapper(block, preserve_rng_state=dropout)
            if cfg.compile:
                block = torch.compile(block, fullgraph=True)
            blocks[i] = block

    if d.mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    for blocks in shardable_blocks(model):
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again right away by the
            # root's final layer, so keeping them gathered saves one all-gather.
            fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skips the gradient reduce-scatter on all but the last accumulation micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
