"""Per-sample weights for midtraining: one number per sample of a shard set, in index order.

A curation pipeline (cluster balancing, rare concepts, quality) scores inputs by their
input key; with `data.weights=PATH` the shard loader draws each epoch's samples with
probability proportional to these weights (data/shard_loader.py: weighted_draws). The
weights are positions in one index, so the file is bound to it: it records the index's
sample count and a digest of its shards list, and is refused for any other index. A
shard set rewritten with other contents (other sha256), reordered or grown is another
index: the weights must be mapped onto it again (weights_for_sources).

File format (`k2train-weights/1`): a NumPy .npz archive (a zip; each member is CRC-checked
when read) with two members:

    weights.npy  float64 (total,)   sample i of the index is drawn with P ∝ weights[i]
    meta.npy     0-d unicode array  JSON {"format", "total", "shards_sha256", "weights_sha256"}

`shards_sha256` is shards_digest(index); `weights_sha256` the SHA-256 of the weights'
little-endian float64 bytes. Weights are finite, >= 0 (0: never drawn), not all zero;
they need not sum to 1.

    sources = sample_sources("shards/")                  # each sample's input key, index order
    w = weights_for_sources("shards/", {"photos/a": 3.0, "photos/b": 0.5}, default=1.0)
    write_weights("shards/weights.npz", w, "shards/")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from data.shard_loader import ShardIndex

FORMAT = "k2train-weights/1"

log = logging.getLogger(__name__)


def _as_index(index: "ShardIndex | str") -> "ShardIndex":
    from data.shard_loader import ShardIndex  # the loader imports this module

    return ShardIndex(index) if isinstance(index, (str, os.PathLike)) else index


def shards_digest(index: "ShardIndex | str") -> str:
    """SHA-256 of the index's shards list: each shard's name, sample count, bytes and sha256.

    Sample i of an index is fixed by that list (shards in order, members in order), so
    two indexes with one digest put the same samples at the same positions."""
    shards = _as_index(index).meta["shards"]
    listed = [[s["name"], int(s["samples"]), int(s["bytes"]), s.get("sha256")] for s in shards]
    return hashlib.sha256(json.dumps(listed, separators=(",", ":")).encode()).hexdigest()


def weights_sha256(weights_N: np.ndarray) -> str:
    """SHA-256 of the weights as little-endian float64 (what the file records, and the loader's state)."""
    return hashlib.sha256(np.ascontiguousarray(weights_N, dtype="<f8").tobytes()).hexdigest()


def _check_values(weights_N: np.ndarray, total: int, where: str) -> None:
    if weights_N.ndim != 1 or len(weights_N) != total:
        raise ValueError(f"{where}: {weights_N.shape[0] if weights_N.ndim == 1 else weights_N.shape} weights for "
                         f"an index of {total} samples; give one weight per sample, in index order")
    bad = np.flatnonzero(~np.isfinite(weights_N))
    if len(bad):
        raise ValueError(f"{where}: {len(bad)} weights are not finite (NaN or inf), first at sample {bad[0]}")
    bad = np.flatnonzero(weights_N < 0)
    if len(bad):
        raise ValueError(f"{where}: {len(bad)} weights are negative, first at sample {bad[0]} "
                         f"({weights_N[bad[0]]!r}); a weight is >= 0 (0: never drawn)")
    if not weights_N.any():
        raise ValueError(f"{where}: every weight is zero; nothing could be drawn")


def write_weights(path: str, weights_N, index: "ShardIndex | str") -> dict:
    """Write `weights_N` (one per sample of `index`, in index order) to `path`, atomically.

    ValueError (naming `path`) for the wrong length or a negative, NaN, inf or all-zero
    weight; nothing is written then. Returns the file's meta."""
    index = _as_index(index)
    weights_N = np.asarray(weights_N, dtype=np.float64)
    _check_values(weights_N, index.total, f"weights for {path}")
    meta = {"format": FORMAT, "total": index.total, "shards_sha256": shards_digest(index),
            "weights_sha256": weights_sha256(weights_N)}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, weights=weights_N.astype("<f8"), meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return meta


def read_weights(path: str, index: "ShardIndex | str") -> np.ndarray:
    """The float64 (total,) weights in `path` for `index`.

    ValueError naming `path` if it is missing or unreadable, written for another index
    (other sample count or shards list), of the wrong length, or holds negative, NaN, inf
    or only zero weights."""
    index = _as_index(index)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file (data.weights); write one with data.weights.write_weights")
    # A damaged zip fails in many ways (BadZipFile, zlib.error, EOFError, a CRC mismatch as
    # BadZipFile, ValueError from the .npy header, OSError): any failure means unreadable.
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as archive:
            missing = {"weights", "meta"} - set(archive.files)
            if missing:
                raise ValueError(f"members {sorted(missing)} missing (has {sorted(archive.files)})")
            meta = json.loads(str(archive["meta"][()]))
            weights_N = archive["weights"]
    except Exception as e:  # noqa: BLE001 (see above)
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e}); "
                         f"rewrite it with data.weights.write_weights") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {FORMAT!r}")
    if meta.get("total") != index.total:
        raise ValueError(f"{path}: written for an index of {meta.get('total')} samples, but {index.path} holds "
                         f"{index.total}; weights are positions in one index: map them onto this one again "
                         f"(data.weights.weights_for_sources)")
    digest = shards_digest(index)
    if meta.get("shards_sha256") != digest:
        raise ValueError(f"{path}: written for another shard set (shards digest {meta.get('shards_sha256')}, "
                         f"{index.path} has {digest}: shards rewritten, renamed or reordered); map the weights "
                         f"onto this index again (data.weights.weights_for_sources)")
    if weights_N.dtype != np.float64:
        raise ValueError(f"{path}: weights of dtype {weights_N.dtype}, expected float64")
    _check_values(weights_N, index.total, path)
    if weights_sha256(weights_N) != meta.get("weights_sha256"):
        raise ValueError(f"{path}: the weights' sha256 {weights_sha256(weights_N)} is not the recorded "
                         f"{meta.get('weights_sha256')}; the file is damaged, rewrite it")
    return np.ascontiguousarray(weights_N, dtype=np.float64)


def weighted_draws(weights_S: np.ndarray, seed: int, epoch: int, epoch_size: int) -> np.ndarray:
    """(epoch_size,) sample indices drawn with replacement, sample i with P ∝ weights_S[i]: the
    first step of the loader's weighted epoch plan, from the plan's generator of (seed, epoch).

    Inverse-CDF sampling over the nonzero weights only: a zero weight owns no interval,
    so it is never drawn, even where u * sum rounds up to the sum. The points are looked up
    in sorted order (the same answers: numpy's search starts from the previous one's, 5x
    faster at 10M samples than scattered lookups) and put back in draw order."""
    nonzero = np.flatnonzero(weights_S)
    cdf = np.cumsum(weights_S[nonzero])
    x = np.random.default_rng([seed, epoch]).random(epoch_size) * cdf[-1]
    order = np.argsort(x, kind="stable")
    j = np.empty(epoch_size, np.int64)
    j[order] = np.searchsorted(cdf, x[order], side="right")
    return nonzero[np.minimum(j, len(nonzero) - 1)]


def _shard_sources(index: "ShardIndex", shard: int) -> list[str]:
    """The `source` of each sample of one shard, reading only each sample's first member.

    The writers put `<key>.json` first (member names in order); a sample laid out any
    other way is read whole by ShardReader, which also names damage."""
    from data.shard_loader import ShardReader

    rows = np.flatnonzero(index.shard == shard)
    path = os.path.join(index.path, index.shard_names[shard])
    out, reader = [], None
    with open(path, "rb") as f:
        for i in rows.tolist():
            f.seek(int(index.offset[i]))
            head = f.read(tarfile.BLOCKSIZE)
            record = None
            try:
                info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
                if info.name.endswith(".json") and tarfile.BLOCKSIZE + info.size <= int(index.size[i]):
                    record = json.loads(f.read(info.size))
            except (tarfile.HeaderError, ValueError):
                record = None
            if not isinstance(record, dict) or "source" not in record:
                reader = reader or ShardReader(index, text_len=1)
                _, record, _ = reader._read(i)
            out.append(record["source"])
    return out


def sample_sources(index: "ShardIndex | str") -> list[str]:
    """Each sample's `source` (its input's key: docs/SHARDS.md) in index order."""
    index = _as_index(index)
    shards = range(len(index.shard_names))
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1, len(shards)))) as pool:
        per_shard = list(pool.map(lambda s: _shard_sources(index, s), shards))
    return [source for sources in per_shard for source in sources]


def weights_for_sources(index: "ShardIndex | str", weights: Mapping[str, float], default: float = 0.0) -> np.ndarray:
    """float64 (total,): weights[source] for each sample of `index`, `default` where absent.

    Keys of `weights` that name no sample (inputs the writer rejected, or of another shard
    set) are counted in the log and otherwise ignored. Pass the result to write_weights."""
    index = _as_index(index)
    sources = sample_sources(index)
    out_N = np.array([weights.get(s, default) for s in sources], dtype=np.float64)
    matched = len(set(sources) & set(weights))
    log.info("%s: %d of %d samples weighted by source, %d at the default %g; %d weighted sources name no sample",
             index.path, int(sum(s in weights for s in sources)), len(sources),
             int(sum(s not in weights for s in sources)), default, len(weights) - matched)
    return out_N
