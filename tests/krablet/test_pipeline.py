"""The shard writer driven as Krablet jobs: chunk jobs, then the index job, on real PostgreSQL shards."""

import json
import os

import psycopg
import pytest

from krablet.pipeline import ingest_jobs
from krablet.shards import ShardSet, shard_of
from krablet.worker import WorkerConfig, run_pool


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    from data.shapes import ShapesWorld
    from data.shapes_loader import ensure_tiny_encoder

    return ensure_tiny_encoder(tmp_path_factory.mktemp("enc") / "text_encoder", ShapesWorld().all_captions())


def _keys(out):
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    return index, sorted(m for s in index["shards"] for m in s["members"])


def test_ingestion_as_jobs_across_two_shards_writes_every_sample_once(make_shards, tmp_path, tiny_encoder_dir):
    dsns = make_shards(2)
    # Keys hold the output path, so routing depends on it: pick a folder whose jobs land on both shards.
    for attempt in range(100):
        out = str(tmp_path / f"shards{attempt}")
        jobs = ingest_jobs("shapes:48:32", out, tiny_encoder_dir, chunk_size=12, text_len=24)
        if len({shard_of(j.key, 2) for j in jobs}) == 2:
            break
    assert [j.kind for j in jobs] == ["shards.write_chunk"] * 4 + ["shards.index"]
    shards = ShardSet(dsns)
    shards.submit(jobs)
    shards.submit(ingest_jobs("shapes:48:32", out, tiny_encoder_dir, chunk_size=12, text_len=24))  # no-op
    shards.close()
    counts = []
    for dsn in dsns:
        with psycopg.connect(dsn) as conn:
            counts.append(conn.execute("SELECT count(*) FROM krablet_job_states").fetchone()[0])
    assert sum(counts) == 5 and all(counts)  # resubmitting added nothing; both shards hold work

    assert run_pool(WorkerConfig(dsns, drain=True, kind_modules=["krablet.pipeline"]), 2) == 0
    for dsn in dsns:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM krablet_job_states WHERE state <> 'done'").fetchone()[0] == 0
    index, members = _keys(out)
    assert index["total"] == 48 and len(index["shards"]) == 4
    assert sum(sum(s["buckets"].values()) for s in index["shards"]) == 48
    # the same inputs written directly give the same shards
    from data.latents import PixelLatents
    from data.text import TextEncoder
    from data.writer import write_shards

    direct = str(tmp_path / "direct")
    enc = TextEncoder.from_pretrained(tiny_encoder_dir, layers=[1, 2, 3, 4], max_len=24)
    write_shards("shapes:48:32", direct, PixelLatents(), enc, chunk_size=12, progress=lambda *a: None)
    assert _keys(direct)[1] == members


def test_demo_path_krablet_ingestion_then_training_with_grids_and_evaluation(tmp_path):
    """The demo's own commands: `python -m krablet.pipeline` on an embedded PostgreSQL in
    the run directory, then experiment=demo trains on those shards, draws sample grids
    from the shapes world's held-out prompts and can be scored by trainer.evaluate."""
    import subprocess
    import sys

    from krablet_test_helpers import ROOT
    from trainer.evaluate import evaluate

    out = tmp_path / "runs" / "d" / "shards"
    # The demo's flags (scripts/demo.sh), with a briefly trained autoencoder.
    cmd = [sys.executable, "-m", "krablet.pipeline", "--input", "shapes:48:32", "--output", str(out),
           "--chunk-size", "16", "--resolution", "32", "--bucket-multiple", "16", "--latents", "shapes_ae",
           "--vae-path", str(tmp_path / "runs" / "d" / "autoencoder"), "--ae", "steps=30", "num_images=256",
           "num_eval=32", "--text-len", "16", "--workers", "2", "--run-dir", str(tmp_path / "krablet")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("KRABLET_DSNS", None)
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "jobs done 5/5" in proc.stdout  # the autoencoder, 3 chunk jobs, the index job, with progress lines
    index, members = _keys(out)
    assert index["total"] == 48 and len(members) == 48 and index["latents"]["kind"] == "shapes_ae"
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and _keys(out)[1] == members  # a rerun redoes nothing

    train = [sys.executable, "-m", "trainer.train", "experiment=demo", "model=tiny", "model.latent_channels=4",
             "model.patch_size=2", "name=d",
             f"run_root={tmp_path / 'runs'}", "stage.steps=4", "stage.global_batch_size=8", "stage.micro_batch_size=8",
             "data.num_workers=0", "checkpoint.every=4", "log.sample_every=4", "log.sample_steps=2",
             "log.tensorboard=false"]
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "d"
    assert (run_dir / "samples" / "step_00000004.png").exists()
    report = evaluate(str(run_dir), seeds=1, steps=2)
    assert report["step"] == 4 and set(report["trained"]) == {"held-out", "training", "one-shape"}
    assert (run_dir / "eval.png").exists()


def test_job_keys_name_the_inputs_not_just_the_folder(tmp_path):
    """Resubmitting an ingestion adds nothing; another input into the same folder is new work
    (it once matched the old, finished keys and was skipped without writing anything)."""
    from krablet.pipeline import ingest_jobs

    out, enc = str(tmp_path / "out"), str(tmp_path / "enc")
    first = [j.key for j in ingest_jobs("shapes:20:32", out, enc, chunk_size=10)]
    assert first == [j.key for j in ingest_jobs("shapes:20:32", out, enc, chunk_size=10)]
    other = [j.key for j in ingest_jobs("shapes-pink:20:32", out, enc, chunk_size=10)]
    assert len(first) == len(other) == 3 and not set(first) & set(other)
    assert all(k.startswith(f"shards:{os.path.abspath(out)}:") for k in first)


# A few seconds of training: these tests check the plumbing, tests/data/test_autoencoder.py the quality.
TINY_AE = dict(width=8, max_width=16, steps=30, batch_size=8, num_images=64, num_eval=8)


def _ae_jobs(out, ae_dir, encoder):
    from data.autoencoder import AEConfig
    from data.writer import WriterConfig

    return ingest_jobs("shapes:24:32", out, encoder, chunk_size=12, text_len=24, latents="shapes_ae",
                       vae_path=ae_dir, writer=WriterConfig(resolution=32, bucket_multiple=16),
                       autoencoder=AEConfig(**TINY_AE))


def test_shapes_ae_ingestion_trains_the_autoencoder_once_as_a_job(make_shards, tmp_path, tiny_encoder_dir):
    import torch

    from data.autoencoder import read_config
    from data.latents import ShapesAELatents, images_from_uint8
    from data.shapes import ShapesWorld
    from data.shard_loader import ShardIndex, ShardReader

    dsns = make_shards(1)
    out, ae_dir = str(tmp_path / "shards"), str(tmp_path / "ae")
    jobs = _ae_jobs(out, ae_dir, tiny_encoder_dir)
    assert [j.kind for j in jobs] == ["shards.train_autoencoder"] + ["shards.write_chunk"] * 2 + ["shards.index"]
    train = jobs[0]
    assert train.key == _ae_jobs(out, ae_dir, tiny_encoder_dir)[0].key  # deterministic, from the settings
    assert train.key.startswith(f"autoencoder:{ae_dir}:") and all(j.deps == (train.key,) for j in jobs[1:3])
    shards = ShardSet(dsns)
    shards.submit(jobs)
    shards.close()
    assert run_pool(WorkerConfig(dsns, drain=True, kind_modules=["krablet.pipeline"]), 2) == 0
    with psycopg.connect(dsns[0]) as conn:
        rows = conn.execute("SELECT kind, state, attempts, result FROM krablet_job_states ORDER BY kind").fetchall()
    assert [r[:3] for r in rows] == [("shards.index", "done", 1), ("shards.train_autoencoder", "done", 1),
                                     ("shards.write_chunk", "done", 1), ("shards.write_chunk", "done", 1)]
    trained = read_config(ae_dir)
    assert rows[1][3]["mae"] == trained["reconstruction"]["mae"]
    index, members = _keys(out)
    assert index["total"] == 24 and index["latents"] == {"kind": "shapes_ae", "channels": 4, "downsample": 4}

    # What the chunk jobs stored is the trained autoencoder's encoding of each image.
    latents = ShapesAELatents.from_pretrained(ae_dir)
    reader = ShardReader(ShardIndex(out), 24)
    for i in (0, 23):
        record, arrays = reader.sample(i)
        image, caption = ShapesWorld(32).sample(int(record["source"].rsplit("/", 1)[1]))
        direct = latents.encode(images_from_uint8(torch.from_numpy(image)[None]))[0]
        assert record["caption"] == caption
        torch.testing.assert_close(torch.from_numpy(arrays["latent"]).float(), direct, rtol=2.0 ** -10, atol=1e-4)

    # Once the folder holds it, an ingestion trains nothing and its chunk keys are the ones already done.
    again = _ae_jobs(out, ae_dir, tiny_encoder_dir)
    assert [j.kind for j in again] == ["shards.write_chunk"] * 2 + ["shards.index"]
    assert [j.key for j in again] == [j.key for j in jobs[1:]] and not any(j.deps for j in again[:2])


def test_worker_encoder_cache_loads_the_autoencoder_once_its_job_is_done(tmp_path, tiny_encoder_dir):
    """A worker that met the folder before the autoencoder existed must not keep that failure."""
    from data.latents import ShapesAELatents
    from krablet.pipeline import _encoders, train_autoencoder_job

    train, chunk = _ae_jobs(str(tmp_path / "shards"), str(tmp_path / "ae"), tiny_encoder_dir)[:2]
    with pytest.raises(ValueError, match="no trained shapes autoencoder"):
        _encoders(chunk.payload)
    assert train_autoencoder_job(train.payload, None)["out"] == str(tmp_path / "ae")
    latents, encoder = _encoders(chunk.payload)
    assert isinstance(latents, ShapesAELatents) and latents.channels == 4
    assert _encoders(chunk.payload) == (latents, encoder)  # cached from now on


def test_pipeline_cli_with_shapes_ae_latents(tmp_path):
    import subprocess
    import sys

    from krablet_test_helpers import ROOT

    out, ae_dir = tmp_path / "shards", tmp_path / "ae"
    cmd = [sys.executable, "-m", "krablet.pipeline", "--input", "shapes:16:32", "--output", str(out),
           "--chunk-size", "8", "--resolution", "32", "--bucket-multiple", "16", "--text-len", "24",
           "--latents", "shapes_ae", "--vae-path", str(ae_dir), "--ae", *(f"{k}={v}" for k, v in TINY_AE.items()),
           "--workers", "2", "--run-dir", str(tmp_path / "krablet")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("KRABLET_DSNS", None)
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "submitted 1 autoencoder job + 2 chunk jobs + 1 index job" in proc.stdout
    assert "jobs done 4/4" in proc.stdout and "[autoencoder] step 30/30" in proc.stdout
    index, members = _keys(out)
    assert index["total"] == 16 and index["latents"]["kind"] == "shapes_ae"
    assert json.loads((ae_dir / "config.json").read_text())["settings"]["steps"] == 30
