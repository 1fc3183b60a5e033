"""ShardLoader: a planned, worker-count independent, exactly resumable stream of same-bucket batches."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.batch import Batch
from data.latents import PixelLatents
from data.shard_loader import ShardLoader
from data.shard_plan import caption_dropped, plan_epoch
from data.writer import WriterConfig, write_shards

TEXT_LEN = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory, encoder, world) -> str:
    """45 captioned images in three buckets (80x48: 15, 64x64: 18, 48x80: 12)."""
    root = tmp_path_factory.mktemp("inputs")
    sizes = [(96, 56)] * 15 + [(64, 64)] * 18 + [(56, 96)] * 12
    for i, (h, w) in enumerate(sizes):
        image, caption = world.sample(i)
        Image.fromarray(image).resize((w, h)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(caption)
    out = str(tmp_path_factory.mktemp("shards"))
    cfg = WriterConfig(resolution=64, bucket_multiple=16, min_side=16, micro_batch=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside conftest's one-thread fixture
    try:
        index = write_shards(str(root), out, PixelLatents(), encoder, cfg, chunk_size=16, progress=None)
    finally:
        torch.set_num_threads(threads)
    buckets = {}
    for shard in index["shards"]:
        for key, count in shard["buckets"].items():
            buckets[key] = buckets.get(key, 0) + count
    assert buckets == {"80x48": 15, "64x64": 18, "48x80": 12}
    return out


def _loader(path, **kw) -> ShardLoader:
    args = dict(batch_size=4, text_len=TEXT_LEN, num_workers=0, caption_dropout=0.2, seed=3)
    return ShardLoader(path, **{**args, **kw})


def _assert_same(a: Batch, b: Batch):
    assert a.captions == b.captions
    for name in ("latents", "text", "text_mask", "sample_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def reference(shards) -> list[Batch]:
    """The first 24 batches (10 an epoch) read in the training process."""
    loader = _loader(shards)
    return [next(loader) for _ in range(24)]


def test_batches_are_same_bucket_and_cross_epochs(shards, reference):
    loader = _loader(shards)
    index = loader.index
    epochs = set()
    for batch in reference:
        ids = batch.sample_ids.numpy() % index.total
        epochs.update((batch.sample_ids.numpy() // index.total).tolist())
        (bucket,) = set(index.bucket[ids].tolist())
        h, w = index.buckets[bucket]
        assert batch.latents.shape == (4, 3, h, w) and batch.text.shape == (4, TEXT_LEN, 4, 128)
        assert batch.latents.dtype == batch.text.dtype == torch.float32 and batch.text_mask.dtype == torch.bool
        assert batch.repa is None
    assert epochs == {0, 1, 2}  # infinite: epochs follow one another
    ids = torch.cat([b.sample_ids for b in reference]).tolist()
    assert len(ids) == len(set(ids))  # a draw id is unique (epoch * total + sample)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_is_exact_and_independent_of_workers(shards, reference, num_workers):
    loader = _loader(shards, num_workers=num_workers, prefetch=3)
    for want in reference[:7]:
        _assert_same(next(loader), want)  # the same stream whatever the worker count
    state = loader.state_dict()
    # Counted as handed out, not as prefetched by the workers.
    assert state == {"epoch": 0, "batches_yielded": 7, "world_size": 1, "batch_size": 4, "seed": 3}
    resumed = _loader(shards, num_workers=num_workers)
    resumed.load_state_dict(state)
    for want in reference[7:]:
        _assert_same(next(resumed), want)
    assert resumed.state_dict()["epoch"] == 2


def test_ranks_are_disjoint_equal_and_cover_the_data(shards):
    index = _loader(shards).index
    for world_size, batch_size in [(2, 4), (3, 2), (2, 1)]:
        plans = [plan_epoch(index.bucket, 3, 0, r, world_size, batch_size) for r in range(world_size)]
        assert len({len(p) for p in plans}) == 1  # equal step counts
        ids = np.concatenate([p.ravel() for p in plans])
        assert len(ids) == len(set(ids.tolist()))  # disjoint
        for p in plans:
            assert all(len(set(index.bucket[row].tolist())) == 1 for row in p)
        # Dropped: at most the world_size remainder plus one partial batch per bucket per
        # rank, plus the batches cut to equalise ranks.
        assert len(ids) >= index.total - world_size - world_size * 3 * (batch_size - 1) - world_size * 3 * batch_size
        if batch_size == 1:  # nothing is partial: the ranks cover all but the remainder
            assert len(ids) == index.total - index.total % world_size
    # Over a few epochs every sample is seen (a different remainder is dropped each time).
    seen = {int(i) for e in range(4) for r in range(2) for i in plan_epoch(index.bucket, 3, e, r, 2, 4).ravel()}
    assert seen == set(range(index.total))


def test_two_ranks_take_different_samples_through_the_loader(shards):
    a, b = (_loader(shards, rank=r, world_size=2) for r in range(2))
    ids_a = {i for _ in range(4) for i in next(a).sample_ids.tolist()}
    ids_b = {i for _ in range(4) for i in next(b).sample_ids.tolist()}
    assert not ids_a & ids_b and len(ids_a) == len(ids_b) == 16


def test_other_world_size_or_batch_size_is_refused(shards):
    two = _loader(shards, rank=1, world_size=2)
    next(two)
    state = two.state_dict()
    with pytest.raises(ValueError, match=r"saved with \{'world_size': 2, 'batch_size': 4, 'seed': 3\}, "
                                         r"this run asks for \{'world_size': 1, 'batch_size': 4, 'seed': 3\}"):
        _loader(shards).load_state_dict(state)
    with pytest.raises(ValueError, match="'batch_size': 2"):
        _loader(shards, rank=1, world_size=2, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="text_len=8 but .* up to 15 valid tokens"):
        _loader(shards, text_len=8)


def test_caption_dropout_rate_and_determinism(shards, reference, encoder):
    dropped = caption_dropped(100_000, seed=3, epoch=0, rate=0.2)
    assert abs(dropped.mean() - 0.2) < 0.005
    assert not np.array_equal(dropped, caption_dropped(100_000, seed=3, epoch=1, rate=0.2))
    index = _loader(shards).index
    empty_feats, empty_mask = encoder.encode([""])
    num_dropped = 0
    for batch in reference:
        for i, sid in enumerate(batch.sample_ids.tolist()):
            epoch, sample = divmod(sid, index.total)
            hit = bool(caption_dropped(index.total, 3, epoch, 0.2)[sample])
            assert (batch.captions[i] == "") == hit  # the decision is the pure function's
            if hit:
                num_dropped += 1
                assert torch.equal(batch.text_mask[i], empty_mask[0])
                torch.testing.assert_close(batch.text[i], empty_feats[0], rtol=2.0 ** -11 + 1e-5, atol=1e-6)
    assert 0.08 < num_dropped / (4 * len(reference)) < 0.35
    none = _loader(shards, caption_dropout=0.0)
    assert all(c for _ in range(5) for c in next(none).captions)


def test_the_writer_records_checksums_the_loader_verifies(shards, reference):
    with open(os.path.join(shards, "index.json")) as f:
        entries = json.load(f)["shards"]
    assert len(entries) == 3
    for entry in entries:
        with open(os.path.join(shards, entry["name"]), "rb") as f:
            assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()
    _assert_same(next(_loader(shards, verify="checksum")), reference[0])


# The unweighted plan as it was before weighted plans existed: pinned, so a change to how
# plans are computed cannot move a pretraining run's stream.
PLAN_SHA = "590725edf8df9d3cc3f80891df7d2f5398e98b84269d67707d5a74cea2e3ae24"
STREAM_SHA = "038c202e9d1cde7e75f5782b6a5a7d017a5d19b265e0d716f9e70e2f48277f75"


def test_the_unweighted_plan_and_stream_are_pinned(reference):
    bucket_S = np.random.default_rng(7).integers(0, 3, 1000).astype(np.int32)
    h = hashlib.sha256()
    for seed, epoch, world_size, batch_size in [(0, 0, 1, 4), (3, 2, 2, 4), (5, 1, 3, 7), (1, 9, 8, 1)]:
        for rank in range(world_size):
            plan = plan_epoch(bucket_S, seed, epoch, rank, world_size, batch_size)
            h.update(np.ascontiguousarray(plan, dtype="<i8").tobytes())
    assert h.hexdigest() == PLAN_SHA
    # The loader's stream: which samples, in which batches, with which captions dropped.
    h = hashlib.sha256()
    for batch in reference:
        h.update(batch.sample_ids.numpy().astype("<i8").tobytes())
        h.update("\n".join(batch.captions).encode())
    assert h.hexdigest() == STREAM_SHA
