"""Bad shards through the trainer: a damaged shard set is refused before a step is taken,
naming each shard; a sample with non-finite latents is skipped and reported by shard
and key in train.log, metrics.jsonl and skipped_samples.jsonl."""

import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from data.latents import PixelLatents
from data.shapes import ShapesWorld
from data.shapes_loader import ensure_tiny_encoder
from data.text import TextEncoder
from data.writer import WriterConfig, write_shards
from tests.conftest import ROOT, train_cmd, train_env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 shapes samples at 32 px in 4 shards (pixel latents, the tiny text encoder)."""
    root = tmp_path_factory.mktemp("shards")
    world = ShapesWorld(image_size=32, seed=0)
    enc_dir = ensure_tiny_encoder(root / "encoder", world.all_captions())
    encoder = TextEncoder.from_pretrained(enc_dir, layers=[1, 2, 3, 4], max_len=24)
    cfg = WriterConfig(resolution=32, bucket_multiple=16)
    write_shards("shapes:64:32", str(root / "set"), PixelLatents(), encoder, cfg, chunk_size=16)
    return str(root / "set"), enc_dir


def _train(path, enc_dir, run_root, *extra):
    args = ["experiment=test_tiny", "data=shards", f"data.path={path}", f"data.encoder_path={enc_dir}",
            "data.text_len=24", "data.image_size=32", "data.num_workers=0", f"run_root={run_root}", "name=run",
            "stage.steps=8", "stage.micro_batch_size=8", *extra]
    return subprocess.run(train_cmd(*args), cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)


def _index(path):
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)


def test_a_truncated_and_a_deleted_shard_are_refused_before_training(shards, tmp_path):
    src, enc_dir = shards
    path = shutil.copytree(src, tmp_path / "set")
    names = [s["name"] for s in _index(path)["shards"]]
    with open(path / names[1], "r+b") as f:
        f.truncate(1024)
    os.remove(path / names[3])
    proc = _train(path, enc_dir, tmp_path / "runs")
    assert proc.returncode == 2
    assert f"{names[1]}: size 1024 bytes" in proc.stderr and f"{names[3]}: missing" in proc.stderr
    assert "refusing to start" in proc.stderr
    assert not os.path.exists(tmp_path / "runs" / "run" / "checkpoints")


def test_a_shard_changed_in_place_is_refused_with_checksum_verification(shards, tmp_path):
    src, enc_dir = shards
    path = shutil.copytree(src, tmp_path / "set")
    name = _index(path)["shards"][2]["name"]
    with open(path / name, "r+b") as f:
        f.seek(4096)
        f.write(b"\x00" * 16)
    proc = _train(path, enc_dir, tmp_path / "runs", "data.verify=checksum")
    assert proc.returncode == 2
    assert f"{name}: checksum mismatch" in proc.stderr


def test_a_sample_with_nan_latents_is_skipped_and_reported(shards, tmp_path):
    src, enc_dir = shards
    path = shutil.copytree(src, tmp_path / "set")
    shard = _index(path)["shards"][0]["name"]
    with tarfile.open(path / shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".latent.npy"))
    key = member.name.split(".")[0]
    with open(path / shard, "r+b") as f:  # the first latent values of that sample become NaN (float16)
        f.seek(member.offset_data + member.size - 8)
        f.write(np.full(4, np.nan, np.float16).tobytes())
    proc = _train(path, enc_dir, tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{shard}" in proc.stderr and key in proc.stderr  # named in the log
    run_dir = tmp_path / "runs" / "run"
    with open(run_dir / "skipped_samples.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    # 64 samples, batch 8, 8 steps: one epoch, the bad sample is met once
    assert [(r["shard"], r["key"]) for r in skipped] == [(shard, key)]
    assert "not finite" in skipped[0]["reason"]
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert sum(r.get("data_skipped", 0) for r in rows) == 1
    assert all(np.isfinite(r["loss"]) for r in rows)
