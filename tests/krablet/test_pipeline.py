"""The shard writer driven as Krablet jobs: chunk jobs, then the index job, on real PostgreSQL shards."""

import json
import os

import psycopg
import pytest

from krablet.pipeline import ingest_jobs
from krablet.shards import ShardSet
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
    out = str(tmp_path / "shards")
    jobs = ingest_jobs("shapes:48:32", out, tiny_encoder_dir, chunk_size=12, text_len=24)
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
