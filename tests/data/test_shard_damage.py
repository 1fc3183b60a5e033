"""Damaged shards are named: refused at start (missing, truncated, checksum), named at read
(tar headers), and samples with non-finite or absurd latents are left out of their batch
and reported, the stream staying the same."""

import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data.shard_loader import ShardIndex, ShardLoader, ShardReader
from data.writer import FORMAT, build_index, write_done, write_empty_text, write_tar

BUCKETS = [[8, 8], [8, 16]]
META = {"format": FORMAT, "latents": {"kind": "pixels", "channels": 3, "downsample": 1},
        "text": {"layers": [1, 2], "dim": 8, "max_len": 6, "suffix": 0, "model": "synthetic"},
        "buckets": BUCKETS, "repa": None}
NUM_SHARDS, PER_SHARD, TEXT_LEN = 3, 8, 6
# Sample i of the index is KEYS[i]: build_index lists the chunks in order, write_tar the samples.
KEYS = [f"c{c:06d}-{pos:06d}" for c in range(NUM_SHARDS) for pos in range(PER_SHARD)]
SHARDS = [f"chunk-{c:06d}-0000.tar" for c in range(NUM_SHARDS)]


def _write_set(out: str, bad: dict[str, float] | None = None) -> str:
    """24 random samples, 12 in each of two buckets, in three shards, written by the writer's
    own write_tar / write_done / build_index. latent[0, 0, 0] of each key in `bad` is set to
    its value (write_tar stores what it is given; write_chunk would reject a non-finite one),
    so a set with and one without `bad` differ in those values only."""
    os.makedirs(out)
    write_empty_text(out, np.full((1, 2, 8), 0.5, np.float32))
    for c in range(NUM_SHARDS):
        def samples():
            for pos in range(PER_SHARD):
                key, bucket = f"c{c:06d}-{pos:06d}", pos % 2
                rng = np.random.default_rng([c, pos])
                latent = rng.standard_normal((3, *BUCKETS[bucket]), np.float32).astype(np.float16)
                if key in (bad or {}):
                    latent[0, 0, 0] = bad[key]
                text = rng.standard_normal((2 + pos % 4, 2, 8), np.float32).astype(np.float16)
                record = {"caption": f"caption of {key}", "source": f"synthetic/{key}", "bucket": BUCKETS[bucket]}
                yield key, record, {"latent": latent, "text": text}, bucket

        shard = write_tar(os.path.join(out, SHARDS[c]), samples())
        write_done(out, f"chunk-{c:06d}", [shard], [], META, PER_SHARD)
    build_index(out)
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> str:
    return _write_set(str(tmp_path_factory.mktemp("clean") / "set"))


@pytest.fixture
def copy(clean, tmp_path) -> Path:
    """A copy of the clean set, to damage."""
    return shutil.copytree(clean, tmp_path / "set")


def _loader(path, **kw) -> ShardLoader:
    args = dict(batch_size=4, text_len=TEXT_LEN, num_workers=0, caption_dropout=0.25, seed=1)
    return ShardLoader(str(path), **{**args, **kw})


def _member(path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def _overwrite(path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def test_the_index_records_each_shards_sha256(clean):
    index = json.loads(Path(clean, "index.json").read_text())
    for entry in index["shards"]:
        data = Path(clean, entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    _loader(clean, verify="checksum")  # a sound set starts


def test_a_damaged_tar_header_is_named_at_read_and_refused_by_checksum(copy):
    key, shard = KEYS[13], SHARDS[1]
    member = _member(copy / shard, f"{key}.latent.npy")
    _overwrite(copy / shard, member.offset + 265, b"damaged")  # the header's uname field: a wrong checksum
    named = (rf"{shard}: sample 13 \(key '{key}'\), member '{key}.latent.npy' at byte {member.offset}: "
             rf"damaged tar header \(bad checksum\)")
    with pytest.raises(ValueError, match=named):
        ShardReader(ShardIndex(str(copy)), TEXT_LEN).sample(13)
    # Same size, so verify="size" starts; the batch holding the sample fails with the same
    # message, raised in a DataLoader worker and handed to the training process.
    loader = _loader(copy, num_workers=1)
    (at,) = np.nonzero((loader.plan(0) == 13).any(axis=1))[0]
    for _ in range(at):
        next(loader)
    with pytest.raises(ValueError, match=named):
        next(loader)
    with pytest.raises(ValueError, match=rf"1 of 3 shards are bad, refusing to start:\n  {shard}: checksum mismatch"):
        _loader(copy, verify="checksum")


def test_truncated_and_deleted_shards_are_refused_at_start_in_one_error(copy):
    size = os.path.getsize(copy / SHARDS[0])
    os.truncate(copy / SHARDS[0], size - 1000)
    os.remove(copy / SHARDS[2])
    want = (rf"2 of 3 shards are bad, refusing to start:\n  {SHARDS[0]}: size {size - 1000} bytes, expected {size} "
            rf"\(truncated\)\n  {SHARDS[2]}: missing\n")
    for verify in ("size", "checksum"):
        with pytest.raises(ValueError, match=want):
            _loader(copy, verify=verify)


def test_latent_bytes_damaged_in_place_are_found_by_checksum_only(copy, clean):
    member = _member(copy / SHARDS[2], f"{KEYS[20]}.latent.npy")
    _overwrite(copy / SHARDS[2], member.offset_data + member.size - 32, b"\x00\x3c" * 16)  # sixteen float16 1.0
    # The sizes are right and the values finite: verify="size" starts and reads the damage
    # as data. That is what verify="checksum" is for.
    damaged = ShardReader(_loader(copy).index, TEXT_LEN).sample(20)[1]["latent"]
    sound = ShardReader(ShardIndex(clean), TEXT_LEN).sample(20)[1]["latent"]
    assert (damaged.ravel()[-16:] == 1.0).all() and not np.array_equal(damaged, sound)
    with pytest.raises(ValueError, match=rf"1 of 3 shards are bad.*\n  {SHARDS[2]}: checksum mismatch: sha256 "):
        _loader(copy, verify="checksum")


def test_an_index_without_checksums_reads_but_cannot_be_checksummed(copy, clean):
    path = copy / "index.json"
    index = json.loads(path.read_text())
    for entry in index["shards"]:
        del entry["sha256"]
    path.write_text(json.dumps(index))
    assert torch.equal(next(_loader(copy)).latents, next(_loader(clean)).latents)
    with pytest.raises(ValueError, match=rf"3 of 3 shards are bad.*\n  {SHARDS[0]}: no sha256 in the index"):
        _loader(copy, verify="checksum")
    with pytest.raises(ValueError, match=r"verify must be one of \['size', 'checksum'\], got 'sha'"):
        _loader(copy, verify="sha")


@pytest.mark.parametrize("value, reason", [(float("nan"), "latent not finite: 1 NaN and 0 inf of 384 values"),
                                           (float("inf"), "latent not finite: 0 NaN and 1 inf of 384 values"),
                                           (65504.0, "latent absurd: 1 of 384 values reach |x| >= 10000 (max 65504)"),
                                           (-2e4, "latent absurd: 1 of 384 values reach |x| >= 10000 (max 20000)")])
def test_a_sample_with_bad_latents_is_left_out_and_reported(tmp_path, clean, caplog, value, reason):
    bad = 9  # bucket 1: latents (3, 8, 16)
    path = _write_set(str(tmp_path / "bad"), bad={KEYS[bad]: value})
    # Across two epochs and through worker processes: the stream is the clean one less
    # that sample, position for position, so resuming counts batches as before.
    want, got = _loader(clean), _loader(path, num_workers=2)
    epochs = []
    for _ in range(12):
        a, b = next(want), next(got)
        keep = a.sample_ids % 24 != bad
        assert torch.equal(b.sample_ids, a.sample_ids[keep])
        assert b.captions == [c for c, k in zip(a.captions, keep) if k]
        for name in ("latents", "text", "text_mask"):
            assert torch.equal(getattr(b, name), getattr(a, name)[keep]), name
        assert got.state_dict() == want.state_dict()
        skipped = got.pop_skipped()
        if keep.all():
            assert skipped == [] and len(b) == 4
        else:
            assert len(b) == 3 and skipped == [{"shard": SHARDS[1], "key": KEYS[bad], "sample": bad,
                                                "epoch": got.state_dict()["epoch"], "reason": reason}]
            assert f"({KEYS[bad]} in {SHARDS[1]})" in caplog.text
            caplog.clear()
            epochs.append(skipped[0]["epoch"])
            short, before = b, {**got.state_dict(), "batches_yielded": got.state_dict()["batches_yielded"] - 1}
    assert epochs == [0, 1]  # every sample is planned in every epoch here
    resumed = _loader(path)  # resumed just before the last short batch: the same batch again
    resumed.load_state_dict(before)
    again = next(resumed)
    assert torch.equal(again.sample_ids, short.sample_ids) and torch.equal(again.latents, short.latents)
    assert [s["key"] for s in resumed.pop_skipped()] == [KEYS[bad]]


def test_the_latent_threshold_is_the_loaders_choice(tmp_path):
    path = _write_set(str(tmp_path / "big"), bad={KEYS[0]: 9000.0, KEYS[2]: 2e4})
    for max_abs, dropped in ((1e4, [2]), (1e5, []), (100.0, [0, 2])):
        loader = _loader(path, max_abs_latent=max_abs)
        seen = torch.cat([next(loader).latents.amax(dim=(1, 2, 3)) for _ in range(6)])  # one epoch
        assert len(seen) == 24 - len(dropped)
        assert sorted(s["sample"] for s in loader.pop_skipped()) == dropped
        assert (9000.0 in seen.tolist()) == (0 not in dropped) and (2e4 in seen.tolist()) == (2 not in dropped)


def test_a_batch_of_only_bad_samples_is_an_error_naming_them_all(tmp_path, clean):
    first = _loader(clean).plan(0)[0]
    path = _write_set(str(tmp_path / "bad"), bad={KEYS[i]: float("nan") for i in first})
    named = ".*; ".join(re.escape(f"{SHARDS[i // PER_SHARD]} {KEYS[i]}: latent not finite") for i in first)
    with pytest.raises(ValueError, match=r"every sample of batch 0 of epoch 0 has bad latents, .*: " + named):
        next(_loader(path))
