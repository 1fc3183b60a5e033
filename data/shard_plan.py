"""The epoch plan of the shard loader (data/shard_loader.py's docstring: steps 1-3 and
caption dropout): which samples, in which batches, on which rank, as pure functions of
(bucket per sample, weights, seed, epoch, rank, world size, batch size)."""

from __future__ import annotations

import numpy as np

from data.weights import weighted_draws

_DROPOUT_STREAM = 0xD20F  # a caption-dropout RNG stream apart from the plan's [seed, epoch]


def _deal(stream_S: np.ndarray, bucket_S: np.ndarray, seed: int, epoch: int, rank: int, world_size: int,
          batch_size: int) -> np.ndarray:
    """(num_batches, batch_size) positions in `stream_S` (an epoch's samples in draw order)
    of `rank`'s batches, in stream order: dealt round-robin, grouped by bucket, cut, shuffled."""
    per_rank = len(stream_S) // world_size
    dealt_RS = np.arange(per_rank * world_size).reshape(per_rank, world_size).T  # row r: rank r's positions
    bucket_P = bucket_S[stream_S]
    num_buckets = int(bucket_S.max()) + 1 if len(bucket_S) else 0
    counts_RB = np.stack([np.bincount(bucket_P[row], minlength=num_buckets) for row in dealt_RS])
    num_batches = int((counts_RB // batch_size).sum(axis=1).min()) if per_rank else 0
    mine = dealt_RS[rank]
    batches = []
    for b in range(num_buckets):
        same = mine[bucket_P[mine] == b]  # boolean indexing keeps stream order
        full = len(same) // batch_size * batch_size
        batches.extend(same[:full].reshape(-1, batch_size))
    order = np.random.default_rng([seed, epoch, 1 + rank]).permutation(len(batches))[:num_batches]
    return np.stack([batches[i] for i in order]) if num_batches else np.zeros((0, batch_size), np.int64)


def plan_epoch(bucket_S: np.ndarray, seed: int, epoch: int, rank: int, world_size: int,
               batch_size: int) -> np.ndarray:
    """(num_batches, batch_size) sample indices of `rank`'s batches in `epoch`, in stream order."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(bucket_S))
    return perm[_deal(perm, bucket_S, seed, epoch, rank, world_size, batch_size)]


def plan_weighted_epoch(bucket_S: np.ndarray, weights_S: np.ndarray, seed: int, epoch: int, rank: int,
                        world_size: int, batch_size: int, epoch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, draws): (num_batches, batch_size) sample indices of `rank`'s batches in
    `epoch`, and the position of each in the epoch's weighted_draws (its draw)."""
    drawn = weighted_draws(weights_S, seed, epoch, epoch_size)
    draws = _deal(drawn, bucket_S, seed, epoch, rank, world_size, batch_size)
    return drawn[draws], draws


def draw_ids(epoch: int, draws: np.ndarray, samples: np.ndarray, epoch_size: int, total: int) -> np.ndarray:
    """The int64 sample_ids of weighted draws: (epoch * epoch_size + draw) * total + sample."""
    if (epoch + 1) * epoch_size * total >= 2 ** 63:
        raise ValueError(f"epoch {epoch} of {epoch_size} draws from {total} samples: draw ids would overflow int64; "
                         f"use a smaller data.epoch_size")
    return (epoch * epoch_size + draws.astype(np.int64)) * total + samples


def caption_dropped(total: int, seed: int, epoch: int, rate: float) -> np.ndarray:
    """(total,) bool: which samples get the empty prompt in `epoch`."""
    if rate <= 0:
        return np.zeros(total, bool)
    return np.random.default_rng([seed, epoch, _DROPOUT_STREAM]).random(total) < rate
