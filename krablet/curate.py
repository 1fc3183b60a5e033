"""Curation as Krablet jobs: embed, filter, deduplicate, cluster, then write the kept images
into shards with per-sample weights for midtraining (`stage=midtrain`).

    python -m krablet.curate --input runs/demo/curation/raw --output runs/demo/curation \\
        --labelled runs/demo/curation/labelled --rare pink --encoder runs/demo/shards/text_encoder \\
        --resolution 32 --bucket-multiple 16 --text-len 16 --latents shapes_ae --vae-path runs/demo/autoencoder

The jobs (krablet/curate_jobs.py), in order (each waits for the ones it needs):

    curate.embed     per chunk: decode, hash the pixels, embed (data/embeddings.py)
    curate.filters   once: the synthetic-image probe (data/probe.py) from labelled real and
                     generated examples, the SAE (data/sae.py) on the pool's embeddings with
                     its latents named from labelled defects and styles
    curate.filter    per chunk: drop generated images, real defects and unsafe images
                     (trainer/safety.py's checker, the one the sampling CLI uses)
    curate.dedup     once: exact (pixel hash) and near (cosine, FAISS) duplicates (data/dedup.py)
    curate.cluster   once: hierarchical k-means (data/clusters.py), balanced weights with rare
                     entities prioritised and a gap report (data/balance.py)
    shards.*         the kept images written into OUTPUT/shards (krablet/pipeline.py's jobs)

then OUTPUT/shards/weights.npz aligned to the shards' index (data/weights.py). Every stage
records its decision on each input it saw in the lineage table (krablet/lineage.py):

    python -m krablet --run-dir runs/demo/curation/krablet lineage img000123
    python -m krablet --run-dir runs/demo/curation/krablet lineage --summary

Rerunning the command resumes: done jobs are not run again (their keys are known), a
job whose worker died is re-run and rewrites the same files and lineage rows.

`--labelled DIR` holds the filters' labelled examples as subfolders of images: `real/`
and `generated/` for the probe; `defect-<name>/` (e.g. defect-jpeg) and `style-<name>/`
(e.g. style-blur) to name SAE latents. `python -m krablet.curate --make-labelled DIR`
writes the shapes world's (data/shapes_curation.py).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from krablet.curate_jobs import read_json


# ---- the pipeline -------------------------------------------------------------------------------------
def curate_jobs(inputs: str, out: str, labelled: str, dsns: list[str], chunk_size: int = 500,
                family: str = "open_clip", model: str = "k2-tiny-resnet", pretrained: str | None = None,
                resolution: int = 32, target_recall: float = 0.95, dedup_threshold: float = 0.99,
                levels: tuple[int, ...] = (64, 16, 4, 2), budget: int | None = None, rare: tuple[str, ...] = (),
                sae: dict | None = None, blocklists: tuple[str, ...] = (), safety: str | None = None,
                seed: int = 0):
    """(chunks, jobs) of the curation stages, before any shard is written."""
    from data.shard_inputs import list_chunks
    from data.writer import WriterConfig
    from krablet.pipeline import _digest
    from krablet.queue import NewJob

    out = os.path.abspath(out)
    check_labelled(labelled)
    chunks = list_chunks(inputs, chunk_size)
    total = sum(len(c.items) for c in chunks)
    writer = asdict(WriterConfig(resolution=resolution, bucket_multiple=1, min_side=1))
    embedder = {"family": family, "model": model, "pretrained": pretrained}
    tag = _digest([inputs, embedder, chunk_size])
    embeds = [NewJob("curate.embed", {"chunk": c.to_json(), "out": out, "writer": writer, "dsns": dsns, **embedder},
                     key=f"curate:{out}:embed:{c.name}:{tag}") for c in chunks]
    filters_payload = {"out": out, "labelled": os.path.abspath(labelled), "target_recall": float(target_recall),
                       "sae": dict(sae or {"n_latents": 256, "k": 16, "steps": 600}), "resolution": resolution,
                       **embedder}
    filters = NewJob("curate.filters", filters_payload, key=f"curate:{out}:filters:{_digest([tag, filters_payload])}",
                     deps=tuple(j.key for j in embeds))
    filtered = [NewJob("curate.filter", {"out": out, "chunk": c.name, "dsns": dsns, "blocklists": list(blocklists),
                                         "safety": safety, "writer": writer,
                                         **({"chunk_json": c.to_json()} if safety else {})},
                       key=f"curate:{out}:filter:{c.name}:{_digest([filters.key, list(blocklists), safety])}",
                       deps=(filters.key,)) for c in chunks]
    names = [c.name for c in chunks]
    dedup = NewJob("curate.dedup", {"out": out, "chunks": names, "threshold": float(dedup_threshold), "dsns": dsns},
                   key=f"curate:{out}:dedup:{_digest([[j.key for j in filtered], dedup_threshold])}",
                   deps=tuple(j.key for j in filtered))
    cluster_payload = {"out": out, "chunks": names, "levels": list(levels), "budget": int(budget or total),
                       "rare": list(rare), "seed": seed, "dsns": dsns}
    cluster = NewJob("curate.cluster", cluster_payload,
                     key=f"curate:{out}:cluster:{_digest([dedup.key, {k: v for k, v in cluster_payload.items() if k != 'dsns'}])}",
                     deps=(dedup.key,))
    return chunks, embeds + [filters] + filtered + [dedup, cluster]


def check_labelled(folder: str) -> None:
    """ValueError naming what is missing from a labelled-examples folder (see the module docstring)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no labelled-examples folder (real/, generated/, defect-<name>/, style-<name>/); "
                         f"`python -m krablet.curate --make-labelled {folder}` writes the shapes world's")
    subs = set(os.listdir(folder))
    missing = [s for s in ("real", "generated") if s not in subs]
    if missing or not any(s.startswith("defect-") for s in subs):
        raise ValueError(f"{folder}: needs real/, generated/ and at least one defect-<name>/ folder of images "
                         f"(has {sorted(subs)})")
    for sub in sorted(subs):
        path = os.path.join(folder, sub)
        if os.path.isdir(path) and not any(n.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
                                           for n in os.listdir(path)):
            raise ValueError(f"{path}: no images")


def kept_chunks(chunks, out: str):
    """The input chunks cut down to the images every stage kept (same chunk numbers)."""
    from data.shard_inputs import Chunk

    kept = set(read_json(os.path.join(out, "dedup.json"), "the dedup result"))
    cut = [Chunk(c.index, tuple(it for it in c.items if it.key in kept)) for c in chunks]
    return [c for c in cut if c.items]


def write_weights_for_shards(out: str, shard_dir: str) -> str:
    from data.shard_loader import ShardIndex
    from data.weights import weights_for_sources, write_weights

    by_source = read_json(os.path.join(out, "weights_by_source.json"), "the balanced weights")
    index = ShardIndex(shard_dir)
    path = os.path.join(shard_dir, "weights.npz")
    write_weights(path, weights_for_sources(index, by_source), index)
    return path


def _has_planted(inputs: str) -> bool:
    path = os.path.join(inputs, "captions.jsonl")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return '"planted"' in f.readline()


def planted_table(inputs: str, dropped_at: dict[str, str]) -> str:
    """Precision and recall of the drops against the planted kinds of a pool written by
    data/shapes_curation.py (its captions.jsonl records each image's kind)."""
    from data.shapes_curation import DEFECTS, STYLES

    truth = {}
    with open(os.path.join(inputs, "captions.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            truth[os.path.splitext(row["file"])[0]] = row["planted"]
    should_drop = {"generated": "synthetic", **{d: "defects" for d in DEFECTS}, "duplicate": "exact_dup",
                   "near_dup": "near_dup"}
    lines = ["| planted kind | images | dropped | by the expected stage | kept |", "| --- | ---: | ---: | ---: | ---: |"]
    for kind_name in sorted(set(truth.values())):
        keys = [k for k, v in truth.items() if v == kind_name]
        dropped = [k for k in keys if k in dropped_at]
        right = [k for k in dropped if dropped_at[k] == should_drop.get(kind_name)]
        lines.append(f"| {kind_name}{' (keep)' if kind_name in STYLES or kind_name in ('clean', 'rare') else ''} | "
                     f"{len(keys)} | {len(dropped)} | {len(right)} | {len(keys) - len(dropped)} |")
    for stage in ("synthetic", "defects", "exact_dup", "near_dup"):
        targets = {k for k, v in truth.items() if should_drop.get(v) == stage}
        got = {k for k, s in dropped_at.items() if s == stage}
        precision = len(got & targets) / max(len(got), 1)
        recall = len(got & targets) / max(len(targets), 1)
        lines.append(f"| **{stage}** drops: precision {precision:.2f}, recall {recall:.2f} | | {len(got)} | | |")
    return "\n".join(lines)


def _undone(dsns: list[str], keys: list[str]) -> list[str]:
    from krablet.queue import ShardQueue, connect

    done: set[str] = set()
    for dsn in dsns:
        with connect(dsn) as conn:
            done |= set(ShardQueue(conn).done_keys(keys))
    return [k for k in keys if k not in done]


def main(argv: list[str] | None = None) -> int:
    from krablet.cli import configured_dsns, shard_dsns
    from krablet.lineage import dropped_items, format_summary, summary
    from krablet.pipeline import _Progress, ingest_jobs
    from krablet.schema import migrate
    from krablet.shards import ShardSet
    from krablet.worker import WorkerConfig, run_pool

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="folder or .tar of images with captions (data/shard_inputs.py)")
    p.add_argument("--output", help="curation folder: embeddings, filters, decisions, shards/")
    p.add_argument("--labelled", help="labelled examples (see above); default OUTPUT/labelled")
    p.add_argument("--make-labelled", metavar="DIR", help="write the shapes world's labelled examples into DIR, exit")
    p.add_argument("--chunk-size", type=int, default=500)
    p.add_argument("--family", default="open_clip", choices=["open_clip", "dinov3"])
    p.add_argument("--model", default="k2-tiny-resnet")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--target-recall", type=float, default=0.95, help="of the synthetic-image probe")
    p.add_argument("--dedup-threshold", type=float, default=0.99,
                   help="cosine similarity of near duplicates' thumbnail descriptors")
    p.add_argument("--levels", type=int, nargs="+", default=[64, 16, 4, 2], help="k-means clusters per level")
    p.add_argument("--budget", type=int, default=None, help="balanced draws (default: the kept image count)")
    p.add_argument("--rare", nargs="*", default=[], help="rare entities (caption words) to prioritise")
    p.add_argument("--blocklist", action="append", default=[], help="extra prompt blocklist file (safety)")
    p.add_argument("--safety", default=None, help="package.module:Class image safety checker (trainer/safety.py)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--bucket-multiple", type=int, default=16)
    p.add_argument("--encoder", help="text encoder folder for the shards (a base run's shards/text_encoder)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--latents", default="pixels", choices=["pixels", "qwen_image", "flux2", "shapes_ae"])
    p.add_argument("--vae-path", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dsn", action="append")
    p.add_argument("--run-dir", default=None, help="embedded PostgreSQL here (default OUTPUT/krablet)")
    p.add_argument("--shards", type=int, default=2, help="embedded shard count (the krablet CLI's default too)")
    args = p.parse_args(argv)
    if args.make_labelled:
        from data.shapes_curation import write_labelled

        print(write_labelled(args.make_labelled, image_size=args.resolution))
        return 0
    if not (args.input and args.output and args.encoder):
        p.error("--input, --output and --encoder are required")
    args.run_dir = args.run_dir or os.path.join(args.output, "krablet")
    labelled = args.labelled or os.path.join(args.output, "labelled")
    try:
        configured_dsns(args)
        check_labelled(labelled)
        if not os.path.isdir(args.encoder):
            raise ValueError(f"--encoder {args.encoder}: not a folder (a text encoder: a base run's shards/text_encoder)")
    except (ValueError, OSError) as e:
        p.error(str(e))
    from data.writer import WriterConfig, default_text_layers

    with shard_dsns(args) as dsns:
        for dsn in dsns:
            migrate(dsn)
        chunks, jobs = curate_jobs(args.input, args.output, labelled, dsns, args.chunk_size, args.family, args.model,
                                   args.pretrained, args.resolution, args.target_recall, args.dedup_threshold,
                                   tuple(args.levels), args.budget, tuple(args.rare), None, tuple(args.blocklist),
                                   args.safety)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.workers))))
        config = WorkerConfig(dsns, batch_size=1, drain=True,
                              kind_modules=["krablet.curate_jobs", "krablet.pipeline"])

        def run(phase_jobs, what):
            shards = ShardSet(dsns)
            try:
                shards.submit(phase_jobs)
            finally:
                shards.close()
            print(f"{what}: {len(phase_jobs)} jobs; running {args.workers} workers until drained", flush=True)
            with _Progress(dsns, [j.key for j in phase_jobs]):
                rc = run_pool(config, args.workers)
            undone = _undone(dsns, [j.key for j in phase_jobs])
            if undone:  # a dead job: its error is in the queue (python -m krablet status / retry)
                print(f"{what}: {len(undone)} jobs not done, e.g. {undone[:3]}; see their errors with "
                      f"`python -m krablet status`, fix the cause, then `python -m krablet retry` and rerun", flush=True)
                return rc or 1
            return rc

        if run(jobs, "curation") != 0:
            return 1
        shard_dir = os.path.join(args.output, "shards")
        writer = WriterConfig(resolution=args.resolution, bucket_multiple=args.bucket_multiple)
        ingest = ingest_jobs(kept_chunks(chunks, args.output), shard_dir, args.encoder, args.chunk_size, args.text_len,
                             default_text_layers(args.encoder), args.latents, args.vae_path, writer=writer)
        if run(ingest, "shards of the kept images") != 0:
            return 1
        path = write_weights_for_shards(args.output, shard_dir)
        print(f"{path}: balanced weights for the midtraining loader (data.weights)")
        rows = summary(dsns)
        print(format_summary(rows))
        if _has_planted(args.input):
            table = planted_table(args.input, dropped_items(dsns))
            with open(os.path.join(args.output, "planted.md"), "w") as f:
                f.write(table + "\n")
            print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
