"""Per-sample weights (data/weights.py) and the weighted epoch plan: the file is bound to its
index and refused for any other, draws follow the weights (a zero weight is never drawn),
and the weighted stream resumes exactly whatever the worker count."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from data.shard_loader import ShardIndex, ShardLoader, ShardReader
from data.shard_plan import caption_dropped, plan_weighted_epoch
from data.weights import (FORMAT, read_weights, sample_sources, shards_digest, weighted_draws, weights_for_sources,
                          write_weights)
from data.writer import FORMAT as SHARDS_FORMAT
from data.writer import build_index, write_done, write_empty_text, write_tar

BUCKETS = [[8, 8], [8, 16]]
META = {"format": SHARDS_FORMAT, "latents": {"kind": "pixels", "channels": 3, "downsample": 1},
        "text": {"layers": [1, 2], "dim": 8, "max_len": 6, "suffix": 0, "model": "synthetic"},
        "buckets": BUCKETS, "repa": None}
TEXT_LEN = 6


def _write_set(out: str, num_shards: int = 3, per_shard: int = 10, caption: str = "caption") -> str:
    """num_shards x per_shard random samples, alternating between two buckets; sample i of the
    index has source "in/<i>" (build_index lists chunks in order, write_tar their samples)."""
    os.makedirs(out)
    write_empty_text(out, np.full((1, 2, 8), 0.5, np.float32))
    for c in range(num_shards):
        def samples():
            for pos in range(per_shard):
                i, bucket = c * per_shard + pos, pos % 2
                rng = np.random.default_rng([c, pos])
                latent = rng.standard_normal((3, *BUCKETS[bucket]), np.float32).astype(np.float16)
                text = rng.standard_normal((2 + pos % 3, 2, 8), np.float32).astype(np.float16)
                record = {"caption": f"{caption} {i}", "source": f"in/{i}", "bucket": BUCKETS[bucket]}
                yield f"c{c:06d}-{pos:06d}", record, {"latent": latent, "text": text}, bucket

        shard = write_tar(os.path.join(out, f"chunk-{c:06d}-0000.tar"), samples())
        write_done(out, f"chunk-{c:06d}", [shard], [], META, per_shard)
    build_index(out)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return _write_set(str(tmp_path_factory.mktemp("set") / "s"))


# 30 samples; zeros at 0, 5, ..., 25 and at the last one (29): the CDF's two ends.
PLANTED = np.array([i % 5 for i in range(30)], np.float64)
PLANTED[-1] = 0.0


@pytest.fixture(scope="module")
def weights_file(shards, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("w") / "weights.npz")
    write_weights(path, PLANTED, shards)
    return path


def _loader(path, **kw) -> ShardLoader:
    args = dict(batch_size=2, text_len=TEXT_LEN, num_workers=0, caption_dropout=0.3, seed=5)
    return ShardLoader(path, **{**args, **kw})


# ---- the file ------------------------------------------------------------------------------
def test_the_file_is_an_npz_of_weights_and_meta_bound_to_the_index(shards, weights_file):
    with np.load(weights_file, allow_pickle=False) as z:
        assert sorted(z.files) == ["meta", "weights"]
        meta, stored = json.loads(str(z["meta"][()])), z["weights"]
    assert stored.dtype == np.float64 and np.array_equal(stored, PLANTED)
    # The digest by its documented recipe, from index.json itself.
    with open(os.path.join(shards, "index.json")) as f:
        listed = [[s["name"], s["samples"], s["bytes"], s["sha256"]] for s in json.load(f)["shards"]]
    digest = hashlib.sha256(json.dumps(listed, separators=(",", ":")).encode()).hexdigest()
    assert meta == {"format": FORMAT, "total": 30, "shards_sha256": digest,
                    "weights_sha256": hashlib.sha256(PLANTED.astype("<f8").tobytes()).hexdigest()}
    assert shards_digest(shards) == digest
    assert np.array_equal(read_weights(weights_file, shards), PLANTED)


def _savez(path, weights, **meta_changes) -> str:
    """A file laid out like write_weights', with what write_weights would refuse to write."""
    weights = np.asarray(weights)
    meta = {"format": FORMAT, "total": 30, "weights_sha256": hashlib.sha256(weights.tobytes()).hexdigest()}
    meta.update(meta_changes)
    with open(path, "wb") as f:
        np.savez(f, weights=weights, meta=np.array(json.dumps(meta)))
    return str(path)


def _snapshot(*folders) -> dict:
    """Every file under the folders: size, mtime and sha256 (to show nothing was touched)."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def test_a_bad_weights_file_is_refused_naming_it_and_nothing_is_touched(shards, weights_file, tmp_path):
    digest = shards_digest(shards)
    other_size = _write_set(str(tmp_path / "other_size"), per_shard=8)  # 24 samples
    other_shards = _write_set(str(tmp_path / "other_shards"), caption="another caption")  # 30, other bytes
    good = open(weights_file, "rb").read()
    flipped = bytearray(good)
    at = good.index(PLANTED.astype("<f8").tobytes()) + 8 * 7  # the low byte of weight 7, in place
    flipped[at] ^= 0x01
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.npz").write_bytes(os.urandom(2000))
    cases = [
        (str(tmp_path / "absent.npz"), shards, "no such weights file"),
        (str(tmp_path / "garbage.npz"), shards, "not a readable weights file"),
        (str(tmp_path / "truncated.npz"), shards, "not a readable weights file"),
        (str(tmp_path / "flipped.npz"), shards, "not a readable weights file .*CRC"),  # the zip's CRC-32
        (weights_file, other_size, "written for an index of 30 samples, but .* holds 24"),
        (weights_file, other_shards, "written for another shard set"),
        (_savez(tmp_path / "short.npz", np.ones(29), shards_sha256=digest), shards,
         "29 weights for an index of 30 samples"),
        (_savez(tmp_path / "negative.npz", np.r_[np.ones(29), -1.0], shards_sha256=digest), shards,
         "1 weights are negative, first at sample 29"),
        (_savez(tmp_path / "nan.npz", np.r_[np.nan, np.ones(29)], shards_sha256=digest), shards,
         "1 weights are not finite .* first at sample 0"),
        (_savez(tmp_path / "zero.npz", np.zeros(30), shards_sha256=digest), shards, "every weight is zero"),
        (_savez(tmp_path / "float32.npz", np.ones(30, np.float32), shards_sha256=digest), shards,
         "dtype float32, expected float64"),
        (_savez(tmp_path / "other_format.npz", np.ones(30), format="k2train-weights/0"), shards, "format"),
    ]
    before = _snapshot(shards, other_size, other_shards, tmp_path)
    for path, index, named in cases:
        with pytest.raises(ValueError, match=f"^{path}: .*{named}"):
            read_weights(path, index)
        with pytest.raises(ValueError, match=f"^{path}: .*{named}"):  # the loader refuses before reading a sample
            _loader(index, weights=path)
    assert _snapshot(shards, other_size, other_shards, tmp_path) == before


def test_write_weights_refuses_bad_weights_and_writes_nothing(shards, tmp_path):
    path = str(tmp_path / "w.npz")
    for weights, named in ((np.ones(29), "29 weights for an index of 30"),
                           (np.r_[np.ones(29), -0.5], "negative"), (np.r_[np.ones(29), np.inf], "not finite"),
                           (np.zeros(30), "every weight is zero")):
        with pytest.raises(ValueError, match=f"weights for {path}: .*{named}"):
            write_weights(path, weights, shards)
    assert os.listdir(tmp_path) == []


def test_sample_sources_map_weights_by_input_key(shards, tmp_path):
    assert sample_sources(shards) == [f"in/{i}" for i in range(30)]
    reader = ShardReader(ShardIndex(shards), TEXT_LEN)
    assert sample_sources(shards) == [reader.sample(i)[0]["source"] for i in range(30)]
    got = weights_for_sources(shards, {"in/3": 2.5, "in/17": 0.0, "rejected/9": 7.0}, default=1.0)
    want = np.ones(30)
    want[3], want[17] = 2.5, 0.0
    assert got.dtype == np.float64 and np.array_equal(got, want)
    # A sample whose <key>.json is not its first member (another writer's order) is read whole.
    out = tmp_path / "reordered"
    out.mkdir()
    write_empty_text(str(out), np.full((1, 2, 8), 0.5, np.float32))
    tar_path = out / "chunk-000000-0000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        members = []
        for pos in range(4):
            start = tar.offset
            for name, data in ((f"k{pos}.latent.npy", _npy(np.zeros((3, 8, 8), np.float16))),
                               (f"k{pos}.text.npy", _npy(np.zeros((2, 2, 8), np.float16))),
                               (f"k{pos}.json", json.dumps({"caption": "c", "source": f"odd/{pos}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            members.append([start, tar.offset - start, 0])
    data = tar_path.read_bytes()
    shard = {"name": tar_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "samples": 4,
             "max_text": 2, "members": members}
    write_done(str(out), "chunk-000000", [shard], [], META, 4)
    build_index(str(out))
    assert sample_sources(str(out)) == [f"odd/{pos}" for pos in range(4)]


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# ---- the draws -----------------------------------------------------------------------------
# Chi-square critical value for 22 degrees of freedom at p = 1e-4 (Wilson-Hilferty: 55.8).
CHI2_22 = 55.8


def _chi2(counts, weights) -> float:
    expected = counts.sum() * weights / weights.sum()
    nz = weights > 0
    return float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())


def test_draws_follow_the_weights_and_a_zero_weight_is_never_drawn():
    weights = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 1e-3, 0.0])
    counts = np.bincount(weighted_draws(weights, seed=1, epoch=0, epoch_size=1_000_000), minlength=8)
    assert counts[[0, 4, 7]].tolist() == [0, 0, 0]  # zeros at both ends and inside
    p = weights / weights.sum()
    sigma = np.sqrt(1_000_000 * p * (1 - p))
    assert np.all(np.abs(counts - 1_000_000 * p) <= 5 * sigma + 1), counts
    assert 0 < counts[6] < 3 * 1_000_000 * p[6]  # a tiny weight is drawn, rarely
    assert not np.array_equal(weighted_draws(weights, 1, 0, 100), weighted_draws(weights, 1, 1, 100))
    # A weight at the very top of float64's range is no problem for the CDF.
    assert set(weighted_draws(np.array([0.0, 1e300, 0.0]), 0, 0, 1000).tolist()) == {1}


def test_the_loaders_counts_follow_the_weights(shards, weights_file):
    loader = _loader(shards, weights=weights_file, epoch_size=3000)
    counts = np.bincount(np.concatenate([loader.plan(e).ravel() for e in range(10)]), minlength=30)
    assert counts.sum() >= 10 * 2990  # only each bucket's partial batch is left over
    assert counts[PLANTED == 0].tolist() == [0] * 7
    assert _chi2(counts, PLANTED) < CHI2_22
    assert _chi2(counts, np.ones(30)) > 1000  # the test can tell: against uniform weights it fails
    # Two ranks: equal step counts, same-bucket batches, each draw on one rank only.
    index = loader.index
    plans = [plan_weighted_epoch(index.bucket, PLANTED, 5, 0, r, 2, 4, 500) for r in range(2)]
    assert len(plans[0][0]) == len(plans[1][0]) > 0
    for samples, _ in plans:
        assert all(len(set(index.bucket[row].tolist())) == 1 for row in samples)
    draws = np.concatenate([d.ravel() for _, d in plans])
    assert len(draws) == len(set(draws.tolist()))


# The weighted plan pinned, as the unweighted one is: a run's stream must not move under it
# between versions (its checkpoints resume by position).
WEIGHTED_PLAN_SHA = "d93a89c28aedb468c33e76baadc57a428e3352f8183a6738911e23d313e2b40a"


def test_the_weighted_plan_is_pinned():
    bucket_S = np.random.default_rng(7).integers(0, 3, 1000).astype(np.int32)
    weights = np.random.default_rng(8).pareto(1.0, 1000)
    weights[::7] = 0.0
    h = hashlib.sha256()
    for seed, epoch, world_size, batch_size, epoch_size in [(0, 0, 1, 4, 1000), (3, 2, 2, 4, 700), (5, 1, 3, 7, 3000)]:
        for rank in range(world_size):
            samples, draws = plan_weighted_epoch(bucket_S, weights, seed, epoch, rank, world_size, batch_size,
                                                 epoch_size)
            h.update(np.ascontiguousarray(samples, dtype="<i8").tobytes())
            h.update(np.ascontiguousarray(draws, dtype="<i8").tobytes())
    assert h.hexdigest() == WEIGHTED_PLAN_SHA


# ---- the weighted stream -------------------------------------------------------------------
def _assert_same(a, b):
    assert a.captions == b.captions
    for name in ("latents", "text", "text_mask", "sample_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def reference(shards, weights_file) -> list:
    """22 batches (about 9 an epoch of 20 draws in batches of 2) read in the training process."""
    loader = _loader(shards, weights=weights_file, epoch_size=20)
    return [next(loader) for _ in range(22)]


def test_the_weighted_stream_is_the_plan_with_one_id_and_dropout_per_draw(shards, reference):
    index, epoch_size, ids = ShardIndex(shards), 20, []
    for batch in reference:
        for row, sid in enumerate(batch.sample_ids.tolist()):
            sample, draw = sid % 30, sid // 30
            epoch, draw = divmod(draw, epoch_size)
            assert weighted_draws(PLANTED, 5, epoch, epoch_size)[draw] == sample  # id = (e * E + draw) * total + s
            hit = bool(caption_dropped(epoch_size, 5, epoch, 0.3)[draw])
            assert (batch.captions[row] == "") == hit
            if not hit:
                assert batch.captions[row] == f"caption {sample}"
            assert PLANTED[sample] > 0
            ids.append(sid)
        (bucket,) = set(index.bucket[batch.sample_ids.numpy() % 30].tolist())
        assert batch.latents.shape == (len(batch.captions), 3, *BUCKETS[bucket])
    assert {sid // 30 // epoch_size for sid in ids} == {0, 1, 2}
    assert len(ids) == len(set(ids))  # a sample drawn twice has two ids (its own noise each time)
    assert len({sid % 30 for sid in ids}) < len(ids)  # and some were drawn twice


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_weighted_resume_is_exact_with_any_worker_count(shards, weights_file, reference, num_workers):
    loader = _loader(shards, weights=weights_file, epoch_size=20, num_workers=num_workers, prefetch=3)
    for want in reference[:11]:
        _assert_same(next(loader), want)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_yielded": 11 - len(loader.plan(0)), "world_size": 1, "batch_size": 2,
                     "seed": 5, "weights": hashlib.sha256(PLANTED.astype("<f8").tobytes()).hexdigest(),
                     "epoch_size": 20}
    resumed = _loader(shards, weights=weights_file, epoch_size=20, num_workers=num_workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as train_state.json stores it
    for want in reference[11:]:
        _assert_same(next(resumed), want)


def test_a_resume_with_other_weights_or_none_is_refused(shards, weights_file, tmp_path):
    state = _loader(shards, weights=weights_file, epoch_size=20).state_dict()
    other = str(tmp_path / "other.npz")
    write_weights(other, np.ones(30), shards)
    for loader in (_loader(shards, weights=other, epoch_size=20), _loader(shards, weights=weights_file),
                   _loader(shards)):
        with pytest.raises(ValueError, match="cannot resume the shard loader: the checkpoint was saved with"):
            loader.load_state_dict(state)
    with pytest.raises(ValueError, match="'weights': None"):  # an unweighted run's state into a weighted loader
        _loader(shards, weights=weights_file).load_state_dict(_loader(shards).state_dict())
    with pytest.raises(ValueError, match="epoch_size=20: .* needs weights"):
        _loader(shards, epoch_size=20)


# ---- stage=midtrain through the trainer ----------------------------------------------------
def test_stage_midtrain_draws_by_the_weights_and_a_bad_file_touches_no_checkpoint(tmp_path, encoder):
    from hydra import compose, initialize_config_dir

    from data.latents import PixelLatents
    from data.writer import WriterConfig, write_shards
    from tests.conftest import ROOT
    from trainer.checkpoint import list_checkpoints
    from trainer.loop import train
    from trainer.train import to_config

    shard_dir = str(tmp_path / "shards")
    write_shards("shapes:24:32", shard_dir, PixelLatents(), encoder, WriterConfig(resolution=32, bucket_multiple=16),
                 chunk_size=12, progress=None)
    weights = np.zeros(24)
    weights[::3] = 1.0  # samples 0, 3, ..., 21 only
    path = str(tmp_path / "weights.npz")
    write_weights(path, weights, shard_dir)
    overrides = ["experiment=test_tiny", "stage=midtrain", f"data.path={shard_dir}", f"data.weights={path}",
                 "data.epoch_size=16", "data.text_len=24", "data.image_size=32", "data.num_workers=0",
                 f"run_root={tmp_path / 'runs'}", "name=mid", "deterministic=false", "stage.steps=3",
                 "checkpoint.every=3", "stage.requires=[data.weights]"]  # from random weights: no base run
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = to_config(compose("train", overrides=overrides))
    cfg.validate(world_size=1)
    assert (cfg.stage.name, cfg.stage.kind, cfg.data.name, cfg.data.weights) == ("midtrain", "flow", "shards", path)
    run = train(cfg)
    loader = run.data.loader
    # 3 steps of 2 micro-batches of 4: 6 batches of the weighted plan, past epoch 0's 4.
    assert loader.state_dict() == {"epoch": 1, "batches_yielded": 2, "world_size": 1, "batch_size": 4, "seed": 0,
                                   "weights": hashlib.sha256(weights.tobytes()).hexdigest(), "epoch_size": 16}
    drawn = np.concatenate([loader.plan(0).ravel(), loader.plan(1)[:2].ravel()])
    assert set(drawn.tolist()) <= set(range(0, 24, 3))
    checkpoints = os.path.join(cfg.run_dir, "checkpoints")
    assert list_checkpoints(checkpoints) == [3]
    with open(os.path.join(checkpoints, "step_00000003", "train_state.json")) as f:
        assert json.load(f)["loader"] == loader.state_dict()
    # The weights file damaged: the resumed run stops at the loader, before any checkpoint is read or written.
    before = _snapshot(checkpoints)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=f"^{path}: not a readable weights file"):
        train(cfg)
    assert _snapshot(checkpoints) == before
