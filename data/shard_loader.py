"""Batches from shards (docs/SHARDS.md): planned from index.json alone, read with one seek per sample.

Each epoch has a plan that is a pure function of (index, seed, epoch, world_size,
batch_size):
  1. a seeded permutation of all samples, dealt round-robin to the ranks (the last
     total % world_size samples of the permutation sit the epoch out);
  2. on each rank, its samples grouped by bucket, in permutation order, and cut into
     batches of batch_size; a bucket's last partial batch is dropped (a different one
     each epoch, since the permutation changes);
  3. the rank's batches shuffled, then cut to the smallest batch count of any rank, so
     every rank takes the same number of steps per epoch.
Batch n of the stream is therefore fixed by the plan, whatever reads it. DataLoader
workers take the stream positions p with p % num_workers == worker id, and the
DataLoader hands their results back in position order, so the batches do not depend
on the worker count, and resuming is a matter of rebuilding the plan and starting at
(epoch, batches_yielded) without reading anything before it.

Caption dropout is decided per (seed, epoch, sample index): a sample dropped in one
epoch may keep its caption in the next, and the decision does not depend on the rank.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import Batch

FORMAT = "k2train-shards/1"
_DROPOUT_STREAM = 0xD20F  # a caption-dropout RNG stream apart from the plan's [seed, epoch]
_MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class LatentsInfo:
    """What the trainer needs to know of the latent space the shards were encoded in."""

    kind: str
    channels: int
    downsample: int


class ShardIndex:
    """index.json as flat per-sample arrays: shard, byte offset, byte size, bucket id."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, "index.json")
        if not os.path.exists(index_path):
            raise ValueError(f"{path}: no index.json; write shards with `python -m data.writer` (or build_index)")
        with open(index_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {self.meta.get('format')!r}, this loader reads {FORMAT!r}")
        shards = self.meta["shards"]
        self.shard_names = [s["name"] for s in shards]
        members = [np.asarray(s["members"], dtype=np.int64).reshape(-1, 3) for s in shards]
        self.shard = np.concatenate([np.full(len(m), i, np.int32) for i, m in enumerate(members)] or [[]])
        flat = np.concatenate(members) if members else np.zeros((0, 3), np.int64)
        self.offset, self.size, self.bucket = flat[:, 0], flat[:, 1], flat[:, 2].astype(np.int32)
        self.total = len(self.offset)
        if self.total != self.meta["total"]:
            raise ValueError(f"{index_path}: total={self.meta['total']} but the shards list {self.total} members")
        self.buckets = [tuple(b) for b in self.meta["buckets"]]
        self.latents = LatentsInfo(**{k: self.meta["latents"][k] for k in ("kind", "channels", "downsample")})
        self.text_suffix = int(self.meta["text"].get("suffix", 0))
        self.empty_text = np.load(os.path.join(path, self.meta["empty_text"]))


def plan_epoch(bucket_S: np.ndarray, seed: int, epoch: int, rank: int, world_size: int,
               batch_size: int) -> np.ndarray:
    """(num_batches, batch_size) sample indices of `rank`'s batches in `epoch`, in stream order."""
    per_rank = len(bucket_S) // world_size
    perm = np.random.default_rng([seed, epoch]).permutation(len(bucket_S))[:per_rank * world_size]
    dealt_RS = perm.reshape(per_rank, world_size).T  # row r: rank r's samples, in permutation order
    num_buckets = int(bucket_S.max()) + 1 if len(bucket_S) else 0
    counts_RB = np.stack([np.bincount(bucket_S[row], minlength=num_buckets) for row in dealt_RS])
    num_batches = int((counts_RB // batch_size).sum(axis=1).min()) if per_rank else 0
    mine = dealt_RS[rank]
    batches = []
    for b in range(num_buckets):
        same = mine[bucket_S[mine] == b]  # boolean indexing keeps permutation order
        full = len(same) // batch_size * batch_size
        batches.extend(same[:full].reshape(-1, batch_size))
    order = np.random.default_rng([seed, epoch, 1 + rank]).permutation(len(batches))[:num_batches]
    return np.stack([batches[i] for i in order]) if num_batches else np.zeros((0, batch_size), np.int64)


def caption_dropped(total: int, seed: int, epoch: int, rate: float) -> np.ndarray:
    """(total,) bool: which samples get the empty prompt in `epoch`."""
    if rate <= 0:
        return np.zeros(total, bool)
    return np.random.default_rng([seed, epoch, _DROPOUT_STREAM]).random(total) < rate


@dataclass(frozen=True)
class _Plan:
    """The parameters of the epoch plan and of the batches a worker builds."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    caption_dropout: float
    text_len: int


class _PlannedBatches(IterableDataset):
    """The infinite stream of planned batches from (epoch, batch), split over DataLoader workers."""

    def __init__(self, index: ShardIndex, plan: _Plan, epoch: int, batch: int):
        self.index, self.plan, self.start = index, plan, (epoch, batch)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        reader, p = ShardReader(self.index, self.plan.text_len), self.plan
        epoch, first = self.start
        position = 0
        while True:
            batches = plan_epoch(self.index.bucket, p.seed, epoch, p.rank, p.world_size, p.batch_size)
            if not len(batches):
                raise ValueError(f"{self.index.path}: epoch {epoch} has no full batch of {p.batch_size} on rank {p.rank}")
            dropped = caption_dropped(self.index.total, p.seed, epoch, p.caption_dropout)
            for n in range(first, len(batches)):
                if position % num_workers == worker:
                    yield reader.batch(epoch, n, batches[n], dropped)
                position += 1
            epoch, first = epoch + 1, 0


def _npy_view(buf: memoryview) -> np.ndarray:
    """The array of an .npy file held in `buf`, without copying its data."""
    header = io.BytesIO(bytes(buf[:4096]))
    version = np.lib.format.read_magic(header)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(header)
    if fortran or dtype.hasobject:
        raise ValueError(f"unexpected .npy layout (fortran={fortran}, dtype={dtype})")
    return np.frombuffer(buf, dtype, count=int(np.prod(shape)), offset=header.tell()).reshape(shape)


def _empty(shape: tuple, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    # In a DataLoader worker, a batch tensor is moved to shared memory to reach the
    # trainer; allocating it there saves copying ~250 MB of padded 1024² text per batch.
    if not shared:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class ShardReader:
    """Reads samples with one seek each, keeping a few shard files open (one reader per worker).

    `sample(i) -> (record, {"latent", "text"[, "repa"]: float16 array})` for sample i of the index.
    """

    def __init__(self, index: ShardIndex, text_len: int):
        self.index, self.text_len = index, text_len
        self.files: dict[int, object] = {}
        self.buffer = bytearray()  # reused: the arrays of _read are views valid until the next read

    def _read(self, idx: int) -> tuple[dict, dict[str, np.ndarray]]:
        shard = int(self.index.shard[idx])
        if shard not in self.files:
            if len(self.files) >= _MAX_OPEN_FILES:
                self.files.pop(next(iter(self.files))).close()
            self.files[shard] = open(os.path.join(self.index.path, self.index.shard_names[shard]), "rb")
        f = self.files[shard]
        offset, size = int(self.index.offset[idx]), int(self.index.size[idx])
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        buf = memoryview(self.buffer)[:size]
        f.seek(offset)
        got = f.readinto(buf)
        where = f"{self.index.shard_names[shard]} at byte {offset}"
        if got != size:
            raise ValueError(f"{where}: read {got} of {size} bytes; the shard is truncated or the index stale")
        record, arrays, pos = None, {}, 0
        while pos < size:
            info = tarfile.TarInfo.frombuf(bytes(buf[pos:pos + tarfile.BLOCKSIZE]), "utf-8", "surrogateescape")
            data = buf[pos + tarfile.BLOCKSIZE:pos + tarfile.BLOCKSIZE + info.size]
            pos += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            field = info.name.split(".", 1)[1]
            if field == "json":
                record = json.loads(bytes(data))
            elif field.endswith(".npy"):
                arrays[field[:-4]] = _npy_view(data)
        if record is None or "latent" not in arrays or "text" not in arrays:
            raise ValueError(f"{where}: sample lacks json/latent/text members (has {sorted(arrays)})")
        return record, arrays

    def sample(self, idx: int) -> tuple[dict, dict[str, np.ndarray]]:
        record, arrays = self._read(idx)
        return record, {k: a.copy() for k, a in arrays.items()}

    def batch(self, epoch: int, n: int, ids: np.ndarray, dropped: np.ndarray) -> dict:
        """The planned batch `n` of `epoch` as float32 tensors, text padded to text_len."""
        B, T, suffix = len(ids), self.text_len, self.index.text_suffix
        shared = get_worker_info() is not None
        empty_text = torch.from_numpy(self.index.empty_text)
        out, captions = {}, []
        for b, i in enumerate(ids):
            record, arrays = self._read(int(i))  # views: copied into the batch before the next read
            if b == 0:
                for name in ("latent", "repa") if self.index.meta.get("repa") else ("latent",):
                    out[name] = _empty((B,) + arrays[name].shape, torch.float32, shared)
                out["text"] = _empty((B, T) + empty_text.shape[1:], torch.float32, shared)
                out["text_mask"] = _empty((B, T), torch.bool, shared)
            for name in ("latent", "repa") if "repa" in out else ("latent",):
                out[name][b].copy_(torch.from_numpy(arrays[name]))
            feats = empty_text if dropped[i] else torch.from_numpy(arrays["text"])
            captions.append("" if dropped[i] else record["caption"])
            head = len(feats) - suffix  # prompt tokens at the front, the template suffix at the end
            if head < 0 or len(feats) > T:
                raise ValueError(f"sample {int(i)} ({record['source']}) has {len(feats)} text tokens; "
                                 f"text_len={T} with a {suffix}-token suffix cannot hold them")
            text, mask = out["text"][b], out["text_mask"][b]
            text[:head].copy_(feats[:head])
            text[head:T - suffix].zero_()
            text[T - suffix:].copy_(feats[head:])
            mask.zero_()
            mask[:head] = True
            mask[T - suffix:] = True
        out.update(epoch=epoch, batch=n, captions=captions,
                   sample_ids=torch.from_numpy(epoch * self.index.total + ids.astype(np.int64)))
        out["latents"] = out.pop("latent")
        return out


class ShardLoader:
    """`next(loader) -> Batch` of one bucket for `rank` of `world_size`; never ends; exactly resumable."""

    def __init__(self, path: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 caption_dropout: float = 0.0, text_len: int = 512, num_workers: int = 2, prefetch: int = 2,
                 pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers} and {prefetch}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.index = ShardIndex(path)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.caption_dropout, self.text_len = caption_dropout, text_len
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        longest = max(int(self.index.meta["max_text"]), len(self.index.empty_text))
        if text_len < longest:
            raise ValueError(f"text_len={text_len} but {path} holds prompts of up to {longest} valid tokens "
                             f"(encoded with max_len={self.index.meta['text']['max_len']}); raise data.text_len")
        if not len(self.plan(0)):
            raise ValueError(f"{path}: {self.index.total} samples in {len(self.index.buckets)} buckets give no full "
                             f"batch of {batch_size} per rank on {world_size} ranks")
        self.epoch, self.batches_yielded = 0, 0
        self._iter = None

    @property
    def latents(self) -> LatentsInfo:
        return self.index.latents

    def plan(self, epoch: int) -> np.ndarray:
        """(num_batches, batch_size) global sample indices of this rank's batches in `epoch`."""
        return plan_epoch(self.index.bucket, self.seed, epoch, self.rank, self.world_size, self.batch_size)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            spec = _Plan(self.batch_size, self.rank, self.world_size, self.seed, self.caption_dropout, self.text_len)
            dataset = _PlannedBatches(self.index, spec, self.epoch, self.batches_yielded)
            workers = dict(prefetch_factor=self.prefetch, persistent_workers=False) if self.num_workers else {}
            self._iter = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, **workers))
        out = next(self._iter)
        # Counted here, as the trainer receives the batch: what workers prefetched beyond
        # this point is not consumed and is read again after a resume.
        self.epoch, self.batches_yielded = out["epoch"], out["batch"] + 1
        return Batch(latents=out["latents"], text=out["text"], text_mask=out["text_mask"],
                     sample_ids=out["sample_ids"], captions=list(out["captions"]), repa=out.get("repa"))

    def close(self) -> None:
        """Stop the workers (a later next() starts new ones at the same position)."""
        self._iter = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "batches_yielded", "world_size", "batch_size", "seed"} - set(state)
        if missing:
            raise ValueError(f"shard loader state lacks {sorted(missing)}; got keys {sorted(state)}")
        saved = {k: int(state[k]) for k in ("world_size", "batch_size", "seed")}
        asked = {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed}
        if saved != asked:
            raise ValueError(
                f"cannot resume the shard loader: the checkpoint was saved with {saved}, this run asks for {asked}. "
                f"The epoch plan (which samples each rank sees, in which batches) depends on all three, so the "
                f"position {state['batches_yielded']} in epoch {state['epoch']} means nothing under another; "
                f"resume with the saved values")
        self.close()
        self.epoch, self.batches_yielded = int(state["epoch"]), int(state["batches_yielded"])
