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

With per-sample weights (data/weights.py; midtraining), step 1 draws instead: epoch_size
samples with replacement, sample i with probability weights[i] / sum(weights), from the
generator of (seed, epoch); steps 2 and 3 deal and cut the draws as they would the
permutation. A sample may then come up several times in an epoch, so caption dropout is
decided per draw, and each draw has its own id ((epoch * epoch_size + draw) * total +
sample: per-sample noise differs between the copies, and id % total is still the sample).
The plan is then a pure function of (index, weights, seed, epoch, world_size, batch_size,
epoch_size), and resuming is as exact as without weights.

Damage is found as early as it can be: at start every shard must exist with the byte
size the index records (verify="checksum" also compares each file's sha256 with the
writer's), a damaged tar header is named at read by shard, key and byte, and a sample
whose latents are not finite or absurd is left out of its batch and reported
(ShardLoader.pop_skipped) rather than trained on. Leaving it out changes no plan: the
batch is one shorter, the stream and its positions are the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import Batch
from data.shard_plan import caption_dropped, draw_ids, plan_epoch, plan_weighted_epoch
from data.weights import read_weights, weights_sha256

FORMAT = "k2train-shards/1"
_MAX_OPEN_FILES = 64
VERIFY = ("size", "checksum")
# Latents are stored normalised (about unit scale; pixels in [-1, 1]), so |x| of 1e4 is
# thousands of standard deviations out: never a real tail, always an encoder that blew up
# or a saturated float16 (65504 is its largest finite value, which 1e4 also catches). One
# such value squared in the flow loss outweighs the rest of the batch by orders of magnitude.
MAX_ABS_LATENT = 1e4

log = logging.getLogger(__name__)


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

    def verify(self, mode: str = "size") -> None:
        """ValueError listing every bad shard, or None when all are sound.

        "size": each shard exists and has the byte size the index records (a stat per shard;
        finds deleted and truncated shards, not bytes damaged in place). "checksum": that,
        and the sha256 of each file equals the writer's (reads every byte, shards hashed in
        parallel threads); an index written before the writer recorded checksums is refused.
        """
        if mode not in VERIFY:
            raise ValueError(f"verify must be one of {list(VERIFY)}, got {mode!r}")
        shards, problems = self.meta["shards"], {}
        ends = np.zeros(len(shards), np.int64)  # the last byte any member of the shard reaches
        np.maximum.at(ends, self.shard, self.offset + self.size)
        for s, entry in enumerate(shards):
            name, want = entry["name"], int(entry["bytes"])
            try:
                size = os.path.getsize(os.path.join(self.path, name))
            except FileNotFoundError:
                problems[name] = "missing"
                continue
            if size != want:
                problems[name] = f"size {size} bytes, expected {want} ({'truncated' if size < want else 'grown'})"
            elif ends[s] > want:
                problems[name] = f"the index places members up to byte {ends[s]} of a {want}-byte shard (stale index)"
        if mode == "checksum":
            todo = [e for e in shards if e["name"] not in problems]
            for entry in todo:
                if "sha256" not in entry:
                    problems[entry["name"]] = "no sha256 in the index (written before the writer recorded checksums)"
            todo = [e for e in todo if "sha256" in e]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1, len(todo)))) as pool:
                digests = list(pool.map(lambda e: _sha256(os.path.join(self.path, e["name"])), todo))
            for entry, digest in zip(todo, digests):
                if digest != entry["sha256"]:
                    problems[entry["name"]] = f"checksum mismatch: sha256 {digest}, expected {entry['sha256']}"
            log.info("%s: sha256 of %d shards (%.2f GB) verified in %.1fs", self.path, len(todo),
                     sum(e["bytes"] for e in todo) / 1e9, time.perf_counter() - t0)
        if problems:
            lines = "".join(f"\n  {name}: {why}" for name, why in problems.items())
            raise ValueError(f"{self.path}: {len(problems)} of {len(shards)} shards are bad, refusing to start:"
                             f"{lines}\nRewrite their chunks (delete done/<chunk>.json, rerun the writer, build_index).")


def _sha256(path: str) -> str:
    digest, buf = hashlib.sha256(), bytearray(8 << 20)
    with open(path, "rb") as f:
        while got := f.readinto(buf):
            digest.update(memoryview(buf)[:got])  # hashlib lets go of the GIL here: threads hash in parallel
    return digest.hexdigest()


@dataclass(frozen=True)
class _Plan:
    """The parameters of the epoch plan and of the batches a worker builds."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    caption_dropout: float
    text_len: int
    max_abs_latent: float
    epoch_size: int = 0  # draws per epoch of a weighted plan (0: unweighted)


class _PlannedBatches(IterableDataset):
    """The infinite stream of planned batches from (epoch, batch), split over DataLoader workers."""

    def __init__(self, index: ShardIndex, plan: _Plan, epoch: int, batch: int, weights_S: np.ndarray | None = None):
        self.index, self.plan, self.start, self.weights_S = index, plan, (epoch, batch), weights_S

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        p, total = self.plan, self.index.total
        reader = ShardReader(self.index, p.text_len, p.max_abs_latent)
        epoch, first = self.start
        position = 0
        while True:
            if self.weights_S is None:
                batches = plan_epoch(self.index.bucket, p.seed, epoch, p.rank, p.world_size, p.batch_size)
                dropped = caption_dropped(total, p.seed, epoch, p.caption_dropout)
            else:
                batches, draws = plan_weighted_epoch(self.index.bucket, self.weights_S, p.seed, epoch, p.rank,
                                                     p.world_size, p.batch_size, p.epoch_size)
                dropped = caption_dropped(p.epoch_size, p.seed, epoch, p.caption_dropout)  # per draw
            if not len(batches):
                raise ValueError(f"{self.index.path}: epoch {epoch} has no full batch of {p.batch_size} "
                                 f"on rank {p.rank}")
            for n in range(first, len(batches)):
                if position % num_workers == worker:
                    if self.weights_S is None:
                        yield reader.batch(epoch, n, batches[n], dropped)
                    else:
                        yield reader.batch(epoch, n, batches[n], dropped, dropped_rows=dropped[draws[n]],
                                           sample_ids=draw_ids(epoch, draws[n], batches[n], p.epoch_size, total))
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


def _header_name(header: memoryview) -> str:
    """The name field of the tar header at the start of `header`, read as it stands,
    checksum or not, so that a damaged header can still be named."""
    return bytes(header[:100]).split(b"\0", 1)[0].decode("utf-8", "replace")


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

    def __init__(self, index: ShardIndex, text_len: int, max_abs_latent: float = MAX_ABS_LATENT):
        self.index, self.text_len, self.max_abs_latent = index, text_len, max_abs_latent
        self.files: dict[int, object] = {}
        self.buffer = bytearray()  # reused: the arrays of _read are views valid until the next read

    def _read(self, idx: int) -> tuple[str, dict, dict[str, np.ndarray]]:
        """(key, record, arrays) of sample idx; the arrays are views into self.buffer."""
        shard = int(self.index.shard[idx])
        path = os.path.join(self.index.path, self.index.shard_names[shard])
        if shard not in self.files:
            if len(self.files) >= _MAX_OPEN_FILES:
                self.files.pop(next(iter(self.files))).close()
            self.files[shard] = open(path, "rb")
        f = self.files[shard]
        offset, size = int(self.index.offset[idx]), int(self.index.size[idx])
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        buf = memoryview(self.buffer)[:size]
        f.seek(offset)
        got = f.readinto(buf)
        if got != size:
            raise ValueError(f"{path}: sample {idx} at byte {offset}: read {got} of {size} bytes; "
                             f"the shard is truncated or the index stale")
        key = _header_name(buf).split(".", 1)[0]
        record, arrays, pos = None, {}, 0
        while pos < size:
            where = f"{path}: sample {idx} (key {key!r}), member {_header_name(buf[pos:])!r} at byte {offset + pos}"
            try:
                info = tarfile.TarInfo.frombuf(bytes(buf[pos:pos + tarfile.BLOCKSIZE]), "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise ValueError(f"{where}: damaged tar header ({e}); rewrite the shard's chunk") from None
            end = pos + tarfile.BLOCKSIZE + info.size
            if end > size or not info.name.startswith(f"{key}."):
                raise ValueError(f"{where}: member {info.name!r} of {info.size} bytes does not belong to the "
                                 f"{size}-byte sample {key!r}; the index is stale or the shard damaged")
            data, field = buf[pos + tarfile.BLOCKSIZE:end], info.name[len(key) + 1:]
            try:
                if field == "json":
                    record = json.loads(bytes(data))
                elif field.endswith(".npy"):
                    arrays[field[:-4]] = _npy_view(data)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
                raise ValueError(f"{where}: member {info.name!r} is damaged: {e}") from None
            pos += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if record is None or "latent" not in arrays or "text" not in arrays:
            raise ValueError(f"{path}: sample {idx} (key {key!r}) at byte {offset} lacks json/latent/text members "
                             f"(has {sorted(arrays)})")
        return key, record, arrays

    def sample(self, idx: int) -> tuple[dict, dict[str, np.ndarray]]:
        _, record, arrays = self._read(idx)
        return record, {k: a.copy() for k, a in arrays.items()}

    def batch(self, epoch: int, n: int, ids: np.ndarray, dropped: np.ndarray, dropped_rows: np.ndarray | None = None,
              sample_ids: np.ndarray | None = None) -> dict:
        """The planned batch `n` of `epoch` as float32 tensors, text padded to text_len.

        `dropped` (total,): whose caption is dropped, per sample; a weighted plan, which may
        draw a sample twice, gives `dropped_rows` (B,) per row instead, and its draws'
        `sample_ids` (B,) (default: epoch * total + sample).
        Samples whose latents are not finite or reach max_abs_latent are left out (the batch
        is that much shorter) and listed in out["skipped"]; ValueError if none is left.
        """
        B, T, suffix = len(ids), self.text_len, self.index.text_suffix
        shared = get_worker_info() is not None
        empty_text = torch.from_numpy(self.index.empty_text)
        if dropped_rows is None:
            dropped_rows = dropped[ids]
        if sample_ids is None:
            sample_ids = ids.astype(np.int64) + epoch * self.index.total
        out, captions, kept, skipped = {}, [], [], []
        for row, i in enumerate(ids.tolist()):
            key, record, arrays = self._read(i)  # views: copied into the batch before the next read
            if not out:
                for name in ("latent", "repa") if self.index.meta.get("repa") else ("latent",):
                    out[name] = _empty((B,) + arrays[name].shape, torch.float32, shared)
                out["text"] = _empty((B, T) + empty_text.shape[1:], torch.float32, shared)
                out["text_mask"] = _empty((B, T), torch.bool, shared)
            b = len(kept)  # the row; a skipped sample's row is written over by the next one
            out["latent"][b].copy_(torch.from_numpy(arrays["latent"]))
            why = _bad_latent(out["latent"][b], self.max_abs_latent)
            if why:
                skipped.append({"shard": self.index.shard_names[self.index.shard[i]], "key": key, "sample": i,
                                "epoch": epoch, "reason": why})
                continue
            if "repa" in out:
                out["repa"][b].copy_(torch.from_numpy(arrays["repa"]))
            feats = empty_text if dropped_rows[row] else torch.from_numpy(arrays["text"])
            captions.append("" if dropped_rows[row] else record["caption"])
            head = len(feats) - suffix  # prompt tokens at the front, the template suffix at the end
            if head < 0 or len(feats) > T:
                raise ValueError(f"sample {i} ({record['source']}) has {len(feats)} text tokens; "
                                 f"text_len={T} with a {suffix}-token suffix cannot hold them")
            text, mask = out["text"][b], out["text_mask"][b]
            text[:head].copy_(feats[:head])
            text[head:T - suffix].zero_()
            text[T - suffix:].copy_(feats[head:])
            mask.zero_()
            mask[:head] = True
            mask[T - suffix:] = True
            kept.append(row)
        if not kept:
            named = "; ".join(f"{s['shard']} {s['key']}: {s['reason']}" for s in skipped)
            raise ValueError(f"{self.index.path}: every sample of batch {n} of epoch {epoch} has bad latents, "
                             f"and the trainer cannot take an empty batch: {named}")
        out = {name: t[:len(kept)] for name, t in out.items()}  # views of the same (shared) storage
        out.update(epoch=epoch, batch=n, captions=captions, skipped=skipped,
                   sample_ids=torch.from_numpy(np.ascontiguousarray(sample_ids[kept], dtype=np.int64)))
        out["latents"] = out.pop("latent")
        return out


def _bad_latent(x: torch.Tensor, max_abs: float) -> str | None:
    """Why the latent `x` must not be trained on, or None. NaN fails `<` too, so one pass finds all."""
    peak = float(x.abs().amax())
    if peak < max_abs:
        return None
    nan, inf = int(x.isnan().sum()), int(x.isinf().sum())
    if nan or inf:
        return f"latent not finite: {nan} NaN and {inf} inf of {x.numel()} values"
    big = int((x.abs() >= max_abs).sum())
    return f"latent absurd: {big} of {x.numel()} values reach |x| >= {max_abs:g} (max {peak:g})"


class ShardLoader:
    """`next(loader) -> Batch` of one bucket for `rank` of `world_size`; never ends; exactly resumable."""

    def __init__(self, path: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 caption_dropout: float = 0.0, text_len: int = 512, num_workers: int = 2, prefetch: int = 2,
                 pin_memory: bool = False, verify: str = "size", max_abs_latent: float = MAX_ABS_LATENT,
                 weights: str | None = None, epoch_size: int | None = None):
        """verify: "size" (every shard present with its indexed size) or "checksum" (and its
        sha256 the writer's) before anything is read; see ShardIndex.verify. Samples whose
        latents are not finite or reach |x| >= max_abs_latent are left out of their batch
        (see pop_skipped). weights: a per-sample weights file for this index (data/weights.py):
        each epoch is then epoch_size draws (default: the index's total) with P ∝ weight."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers} and {prefetch}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if not max_abs_latent > 0:
            raise ValueError(f"max_abs_latent must be > 0, got {max_abs_latent}")
        if epoch_size is not None and (weights is None or epoch_size < 1):
            raise ValueError(f"epoch_size={epoch_size}: it is the draws per epoch of a weighted plan, so it needs "
                             f"weights and must be >= 1")
        self.index = ShardIndex(path)
        self.index.verify(verify)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.caption_dropout, self.text_len, self.max_abs_latent = caption_dropout, text_len, max_abs_latent
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        # Read (and refused if it does not fit the index) before anything else is done.
        self.weights_S = read_weights(weights, self.index) if weights is not None else None
        self.epoch_size = (epoch_size or self.index.total) if weights is not None else None
        self.weights_sha256 = weights_sha256(self.weights_S) if weights is not None else None
        longest = max(int(self.index.meta["max_text"]), len(self.index.empty_text))
        if text_len < longest:
            raise ValueError(f"text_len={text_len} but {path} holds prompts of up to {longest} valid tokens "
                             f"(encoded with max_len={self.index.meta['text']['max_len']}); raise data.text_len")
        if not len(self.plan(0)):
            raise ValueError(f"{path}: {self.index.total} samples in {len(self.index.buckets)} buckets give no full "
                             f"batch of {batch_size} per rank on {world_size} ranks")
        self.epoch, self.batches_yielded = 0, 0
        self._iter = None
        self._skipped: list[dict] = []

    @property
    def latents(self) -> LatentsInfo:
        return self.index.latents

    def plan(self, epoch: int) -> np.ndarray:
        """(num_batches, batch_size) global sample indices of this rank's batches in `epoch`."""
        if self.weights_S is not None:
            return plan_weighted_epoch(self.index.bucket, self.weights_S, self.seed, epoch, self.rank,
                                       self.world_size, self.batch_size, self.epoch_size)[0]
        return plan_epoch(self.index.bucket, self.seed, epoch, self.rank, self.world_size, self.batch_size)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            spec = _Plan(self.batch_size, self.rank, self.world_size, self.seed, self.caption_dropout, self.text_len,
                         self.max_abs_latent, self.epoch_size or 0)
            dataset = _PlannedBatches(self.index, spec, self.epoch, self.batches_yielded, self.weights_S)
            workers = dict(prefetch_factor=self.prefetch, persistent_workers=False) if self.num_workers else {}
            self._iter = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, **workers))
        out = next(self._iter)
        # Counted here, as the trainer receives the batch: what workers prefetched beyond
        # this point is not consumed and is read again after a resume.
        self.epoch, self.batches_yielded = out["epoch"], out["batch"] + 1
        for s in out["skipped"]:  # logged here, not in the worker: once per batch handed out
            log.warning("skipped sample %d (%s in %s) of epoch %d batch %d: %s", s["sample"], s["key"], s["shard"],
                        s["epoch"], out["batch"], s["reason"])
        self._skipped += out["skipped"]
        return Batch(latents=out["latents"], text=out["text"], text_mask=out["text_mask"],
                     sample_ids=out["sample_ids"], captions=list(out["captions"]), repa=out.get("repa"))

    def pop_skipped(self) -> list[dict]:
        """The samples left out of the batches handed out so far, since the last call:
        [{"shard": file name, "key": sample key, "sample": index in index.json, "epoch", "reason"}]."""
        skipped, self._skipped = self._skipped, []
        return skipped

    def close(self) -> None:
        """Stop the workers (a later next() starts new ones at the same position)."""
        self._iter = None

    def state_dict(self) -> dict:
        """{epoch, batches_yielded, world_size, batch_size, seed}; a weighted loader adds the
        weights' sha256 and epoch_size, which its plan depends on too."""
        state = {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "world_size": self.world_size,
                 "batch_size": self.batch_size, "seed": self.seed}
        if self.weights_S is not None:
            state.update(weights=self.weights_sha256, epoch_size=self.epoch_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "batches_yielded", "world_size", "batch_size", "seed"} - set(state)
        if missing:
            raise ValueError(f"shard loader state lacks {sorted(missing)}; got keys {sorted(state)}")
        saved = {k: int(state[k]) for k in ("world_size", "batch_size", "seed")}
        asked = {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed}
        if "weights" in state or self.weights_S is not None:
            saved.update(weights=state.get("weights"), epoch_size=state.get("epoch_size"))
            asked.update(weights=self.weights_sha256, epoch_size=self.epoch_size)
        if saved != asked:
            raise ValueError(
                f"cannot resume the shard loader: the checkpoint was saved with {saved}, this run asks for {asked}. "
                f"The epoch plan (which samples each rank sees, in which batches) depends on each of them, so the "
                f"position {state['batches_yielded']} in epoch {state['epoch']} means nothing under another; "
                f"resume with the saved values")
        self.close()
        self.epoch, self.batches_yielded = int(state["epoch"]), int(state["batches_yielded"])
