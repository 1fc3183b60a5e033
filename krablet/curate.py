"""Curation as Krablet jobs: embed, filter, deduplicate, cluster, then write the kept images
into shards with per-sample weights for midtraining (`stage=midtrain`).

    python -m krablet.curate --input runs/demo/curation/raw --output runs/demo/curation \\
        --labelled runs/demo/curation/labelled --rare pink --encoder runs/demo/shards/text_encoder \\
        --resolution 32 --bucket-multiple 16 --text-len 16 --latents shapes_ae --vae-path runs/demo/autoencoder

The jobs, in order (each waits for the ones it needs):

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

import numpy as np

from krablet.kinds import kind, require
from krablet.lineage import Decision, record

# The stages' places in the pipeline: an input's lineage reads in this order.
STAGES = ("validate", "defects", "synthetic", "safety", "exact_dup", "near_dup", "balance")
# Near duplicates are found on a copy-detection descriptor, not the semantic embedding: a
# THUMB x THUMB box-filtered thumbnail, mean-removed per image (pHash-like). Two renders of
# one concept embed alike yet are different images; a re-encoded copy matches pixel for pixel.
THUMB = 16
POSITION = {s: i for i, s in enumerate(STAGES)}


def _decision(item: str, stage: str, kept: bool, score: float | None = None, reason: str = "") -> Decision:
    return Decision(item, stage, "kept" if kept else "dropped", None if score is None else float(score), reason,
                    POSITION[stage])


def _atomic_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({what}); run its job first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt {what} ({e}); delete it and rerun the pipeline") from None


# ---- embedding ----------------------------------------------------------------------------------------
_EMBEDDERS: dict[tuple, object] = {}


def _embedder(p: dict):
    from data.embeddings import build_embedder

    key = (p["family"], p["model"], p.get("pretrained"))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = build_embedder(p["family"], p["model"], p.get("pretrained"))
    return _EMBEDDERS[key]


def _load_images(items, cfg) -> tuple[list, np.ndarray, list[str], list[tuple[str, str]]]:
    """(kept items, images (n, H, W, 3), captions, [(key, reason) of rejects]); images resized
    to the embedder's square input by the embedder itself."""
    from data.shard_inputs import Reject, load_item

    kept, images, captions, rejects = [], [], [], []
    for item in items:
        try:
            image, caption, _ = load_item(item, cfg)
        except Reject as e:
            rejects.append((item.key, str(e)))
            continue
        kept.append(item)
        images.append(np.asarray(image.convert("RGB").resize((cfg.resolution, cfg.resolution))))
        captions.append(caption)
    return kept, (np.stack(images) if images else np.zeros((0, cfg.resolution, cfg.resolution, 3), np.uint8)), \
        captions, rejects


def thumbnails(images_NHWC: np.ndarray) -> np.ndarray:
    """float32 (N, 3 THUMB²): each image's box-filtered thumbnail, its mean removed (THUMB above)."""
    from PIL import Image

    out = np.stack([np.asarray(Image.fromarray(im).resize((THUMB, THUMB), Image.BOX), np.float32).ravel()
                    for im in images_NHWC]) if len(images_NHWC) else np.zeros((0, 3 * THUMB * THUMB), np.float32)
    out -= out.mean(1, keepdims=True)
    out[np.abs(out).max(1) == 0, 0] = 1.0  # a flat image still has a direction (it matches other flat ones)
    return out


def _validate_embed(p: dict) -> None:
    from data.shard_inputs import Chunk

    require(p, chunk=dict, out=str, family=str, model=str, writer=dict, dsns=list)
    Chunk.from_json(p["chunk"])


@kind("curate.embed", validate=_validate_embed)
def embed_job(payload: dict, ctx) -> dict:
    """Decode a chunk, hash each image's pixels (exact duplicates) and embed it; writes
    OUT/embeddings/<chunk> and OUT/items/<chunk>.json ({key: {sha256, caption}})."""
    from data.dedup import pixel_hash
    from data.embeddings import write_embeddings
    from data.shard_inputs import Chunk
    from data.writer import WriterConfig

    chunk = Chunk.from_json(payload["chunk"])
    cfg = WriterConfig(**payload["writer"])
    items, images, captions, rejects = _load_images(chunk.items, cfg)
    ctx.check()
    embedder = _embedder(payload)
    emb = embedder(images) if len(images) else np.zeros((0, embedder.dim), np.float32)
    keys = [it.key for it in items]
    write_embeddings(os.path.join(payload["out"], "embeddings"), chunk.name, keys, emb, embedder.meta())
    write_embeddings(os.path.join(payload["out"], "thumbs"), chunk.name, keys, thumbnails(images),
                     {"model": f"thumbnail-{THUMB}", "version": "1", "dim": 3 * THUMB * THUMB})
    info = {k: {"sha256": pixel_hash(im), "caption": c}
            for k, im, c in zip(keys, images, captions)}
    _atomic_json(os.path.join(payload["out"], "items", f"{chunk.name}.json"), info)
    record(payload["dsns"], [_decision(k, "validate", True) for k in keys]
           + [_decision(k, "validate", False, reason=why) for k, why in rejects])
    return {"embedded": len(keys), "rejects": len(rejects)}


# ---- the filters --------------------------------------------------------------------------------------
def _labelled_images(folder: str, size: int) -> np.ndarray:
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    if not names:
        raise ValueError(f"{folder}: no labelled images")
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB").resize((size, size)))
                     for n in names])


@kind("curate.filters", validate=lambda p: require(p, out=str, labelled=str, family=str, model=str,
                                                    target_recall=float, sae=dict, resolution=int))
def filters_job(payload: dict, ctx) -> dict:
    """Train the defect tagger (an SAE on the pool's standardised embeddings, its latents
    named from labelled defects and styles) and the synthetic-image probe; writes
    OUT/filters/{standardise.npz, tagger.safetensors, probe.safetensors}."""
    from data.embeddings import read_embeddings
    from data.probe import ProbeConfig, train_probe
    from data.sae import fit_tagger, train_sae

    out, labelled = payload["out"], payload["labelled"]
    embedder = _embedder(payload)
    size = payload["resolution"]
    real = np.asarray(embedder(_labelled_images(os.path.join(labelled, "real"), size)))
    fake = np.asarray(embedder(_labelled_images(os.path.join(labelled, "generated"), size)))
    groups = {sub.split("-", 1)[1]: np.asarray(embedder(_labelled_images(os.path.join(labelled, sub), size)))
              for sub in sorted(os.listdir(labelled)) if sub.startswith(("defect-", "style-"))}
    defects = [name for name in groups if os.path.isdir(os.path.join(labelled, f"defect-{name}"))]
    styles = [name for name in groups if name not in defects]
    # The probe runs after the defect filter, so it learns clean real against generated;
    # real images with defects (noise resembles a fingerprint) are the defect filter's.
    probe = train_probe(np.concatenate([real, fake]), np.r_[np.zeros(len(real)), np.ones(len(fake))].astype(int),
                        embedder.meta(), ProbeConfig(target_recall=payload["target_recall"]))
    probe.save(os.path.join(out, "filters", "probe.safetensors"))
    ctx.check()
    _, pool, _ = read_embeddings(os.path.join(out, "embeddings"), expect_dim=embedder.dim)
    pool = np.asarray(pool)
    # An SAE splits variation around the data's mean: embeddings of one tower share a large
    # common direction, so they are standardised by the pool's statistics first.
    mean, std = pool.mean(0), pool.std(0) + 1e-6
    np.savez(os.path.join(out, "filters", "standardise.npz"), mean=mean, std=std)
    z = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    rows = np.concatenate([real, *groups.values()])
    sae, history = train_sae(np.concatenate([z(pool), z(rows)]), embedding=embedder.meta(), **payload["sae"])
    bounds = np.cumsum([len(real)] + [len(e) for e in groups.values()])
    masks = {}
    for name, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
        masks[name] = np.zeros(len(rows), bool)
        masks[name][lo:hi] = True
    clean = np.zeros(len(rows), bool)
    clean[:len(real)] = True
    tagger = fit_tagger(sae, z(rows), masks, clean, defects, styles)
    tagger.save(os.path.join(out, "filters", "tagger.safetensors"))
    return {"probe_threshold": float(probe.threshold), "probe_heldout": probe.report["heldout"],
            "sae_nmse": float(history[-1]["nmse"]), "tagger": tagger.report}


@kind("curate.filter", validate=lambda p: require(p, out=str, chunk=str, dsns=list))
def filter_job(payload: dict, ctx) -> dict:
    """Apply the defect tagger, the probe and the safety checker to one chunk's images;
    writes OUT/kept/<chunk>.json (the keys that pass)."""
    from data.embeddings import chunk_path, read_chunk
    from data.probe import SyntheticImageProbe
    from data.sae import DefectTagger
    from trainer.safety import build_checker

    out, name = payload["out"], payload["chunk"]
    probe = SyntheticImageProbe.load(os.path.join(out, "filters", "probe.safetensors"))
    tagger = DefectTagger.load(os.path.join(out, "filters", "tagger.safetensors"))
    keys, emb, meta = read_chunk(chunk_path(os.path.join(out, "embeddings"), name), expect_dim=probe.embedding["dim"])
    emb = np.asarray(emb)
    try:
        stats = np.load(os.path.join(out, "filters", "standardise.npz"))
        mean, std = stats["mean"], stats["std"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{os.path.join(out, 'filters', 'standardise.npz')}: missing or damaged ({e}); "
                         f"rerun the curate.filters job") from None
    info = _read_json(os.path.join(out, "items", f"{name}.json"), "the chunk's item list")
    defect, d_score, d_reason = tagger.decide(((emb - mean) / std).astype(np.float32), meta)
    generated, p_fake = probe.decide(emb, meta)
    checker = build_checker(payload.get("blocklists", []), payload.get("safety"))
    image_verdicts = {}
    if payload.get("safety"):  # an image classifier: it needs the pixels, decoded again here
        from data.shard_inputs import Chunk
        from data.writer import WriterConfig

        items, images, captions, _ = _load_images(Chunk.from_json(payload["chunk_json"]).items,
                                                  WriterConfig(**payload["writer"]))
        image_verdicts = dict(zip((it.key for it in items), checker.check_images(images, captions)))
    decisions, kept = [], []
    for i, key in enumerate(keys):
        score = float(d_score[i]) if np.isfinite(d_score[i]) else None
        if defect[i]:
            decisions.append(_decision(key, "defects", False, score, f"sae defect: {d_reason[i]}"))
            continue
        decisions.append(_decision(key, "defects", True, score))
        if generated[i]:
            decisions.append(_decision(key, "synthetic", False, p_fake[i], "probe: looks generated"))
            continue
        decisions.append(_decision(key, "synthetic", True, p_fake[i]))
        verdict = checker.check_prompt(info[key]["caption"])
        if verdict.allowed and key in image_verdicts:
            verdict = image_verdicts[key]
        if not verdict.allowed:
            decisions.append(_decision(key, "safety", False, reason=f"unsafe: {verdict.reason}"))
            continue
        decisions.append(_decision(key, "safety", True))
        kept.append(key)
    record(payload["dsns"], decisions)
    _atomic_json(os.path.join(out, "kept", f"{name}.json"), kept)
    return {"kept": len(kept), "dropped": len(keys) - len(kept)}


# ---- deduplication and balance ------------------------------------------------------------------------
def _survivors(out: str, chunks: list[str], store: str = "embeddings") -> tuple[list[str], np.ndarray, dict]:
    """(keys, vectors of `store`, item info) of the filtered images, in chunk order."""
    from data.embeddings import chunk_path, read_chunk

    keys, embs, info = [], [], {}
    for name in chunks:
        kept = set(_read_json(os.path.join(out, "kept", f"{name}.json"), "the chunk's filter result"))
        ks, emb, _ = read_chunk(chunk_path(os.path.join(out, store), name))
        take = [i for i, k in enumerate(ks) if k in kept]
        keys += [ks[i] for i in take]
        embs.append(np.asarray(emb)[take])
        info.update(_read_json(os.path.join(out, "items", f"{name}.json"), "the chunk's item list"))
    return keys, (np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)), info


@kind("curate.dedup", validate=lambda p: require(p, out=str, chunks=list, threshold=float, dsns=list))
def dedup_job(payload: dict, ctx) -> dict:
    """Exact duplicates by pixel hash, then near duplicates by cosine similarity of the
    thumbnail descriptors (THUMB); one image of each group is kept (the smallest key).
    Writes OUT/dedup.json (the kept keys)."""
    from data.dedup import exact_duplicates, near_duplicates

    out = payload["out"]
    keys, emb, info = _survivors(out, payload["chunks"], "thumbs")
    decisions = []
    exact = exact_duplicates(keys, [info[k]["sha256"] for k in keys])
    after_exact = []
    for i, key in enumerate(keys):
        if exact.kept[i]:
            decisions.append(_decision(key, "exact_dup", True))
            after_exact.append(i)
        else:
            decisions.append(_decision(key, "exact_dup", False, 1.0, f"exact duplicate: of {exact.representative[i]}"))
    ctx.check()
    near = near_duplicates([keys[i] for i in after_exact], emb[after_exact], payload["threshold"])
    kept = []
    for j, i in enumerate(after_exact):
        if near.kept[j]:
            decisions.append(_decision(keys[i], "near_dup", True, near.similarity[j]))
            kept.append(keys[i])
        else:
            decisions.append(_decision(keys[i], "near_dup", False, near.similarity[j],
                                       f"near duplicate: of {near.representative[j]} (cosine {near.similarity[j]:.4f})"))
    record(payload["dsns"], decisions)
    _atomic_json(os.path.join(out, "dedup.json"), kept)
    return {"exact": int((~np.asarray(exact.kept)).sum()), "near": len(after_exact) - len(kept), "kept": len(kept)}


@kind("curate.cluster", validate=lambda p: require(p, out=str, chunks=list, levels=list, budget=int, dsns=list))
def cluster_job(payload: dict, ctx) -> dict:
    """Hierarchical k-means on the kept images and balanced per-image weights (rare entities
    prioritised); writes OUT/weights_by_source.json, OUT/hierarchy.* and OUT/gaps.md."""
    from data.balance import balanced_weights, entity_priority, format_gap_report, gap_report, match_entities
    from data.clusters import HierarchyConfig, build_hierarchy

    out = payload["out"]
    kept = _read_json(os.path.join(out, "dedup.json"), "the dedup result")
    keys, emb, info = _survivors(out, payload["chunks"])
    where = {k: i for i, k in enumerate(keys)}
    emb = emb[[where[k] for k in kept]]
    keys = kept
    hierarchy = build_hierarchy(emb, HierarchyConfig(clusters=list(payload["levels"]), seed=payload.get("seed", 0)),
                                keys=keys, log=lambda line: print(f"[cluster] {line}", flush=True))
    hierarchy.save(os.path.join(out, "hierarchy"))
    ctx.check()
    captions = [info[k]["caption"] for k in keys]
    rare = list(payload.get("rare", []))
    priority = entity_priority(captions, rare, payload.get("boost", 10.0)) if rare else None
    # A budget of one epoch's draws, each image drawn at most max_repeat times its priority:
    # small clusters (and rare entities) are repeated, large ones subsampled.
    weights = balanced_weights(hierarchy, len(keys), priority=priority, max_repeat=payload.get("max_repeat", 4.0))
    top = hierarchy.labels(hierarchy.num_levels)
    report = ["## Top-level clusters, as the data is\n", format_gap_report(gap_report(top)),
              "\n## Top-level clusters, as balanced\n", format_gap_report(gap_report(top, weights))]
    if rare:
        concepts = match_entities(captions, rare)
        target = {name: payload.get("rare_share", 0.1) for name in rare}
        report += ["\n## Rare entities, as the data is\n", format_gap_report(gap_report(concepts, target=target)),
                   "\n## Rare entities, as balanced\n",
                   format_gap_report(gap_report(concepts, weights, target=target))]
    with open(os.path.join(out, "gaps.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    _atomic_json(os.path.join(out, "weights_by_source.json"), dict(zip(keys, map(float, weights))))
    record(payload["dsns"], [_decision(k, "balance", True, w) for k, w in zip(keys, weights)])
    rare_mask = priority > 1 if priority is not None else np.zeros(len(keys), bool)
    return {"images": len(keys), "rare": int(rare_mask.sum()),
            "rare_share_before": float(rare_mask.mean()), "rare_share_after": float(weights[rare_mask].sum() / weights.sum()),
            "weight_max_over_mean": float(weights.max() / max(weights.mean(), 1e-12))}


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

    kept = set(_read_json(os.path.join(out, "dedup.json"), "the dedup result"))
    cut = [Chunk(c.index, tuple(it for it in c.items if it.key in kept)) for c in chunks]
    return [c for c in cut if c.items]


def write_weights_for_shards(out: str, shard_dir: str) -> str:
    from data.shard_loader import ShardIndex
    from data.weights import weights_for_sources, write_weights

    by_source = _read_json(os.path.join(out, "weights_by_source.json"), "the balanced weights")
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
        config = WorkerConfig(dsns, batch_size=1, drain=True, kind_modules=["krablet.curate", "krablet.pipeline"])

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
