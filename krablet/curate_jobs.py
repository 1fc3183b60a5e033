"""The curation job kinds (krablet/curate.py submits them and documents the pipeline).

Each handler reads what the jobs before it wrote into the curation folder, writes its own
files atomically (a re-run job rewrites the same bytes) and records its decision on each
input in the lineage table (krablet/lineage.py)."""

from __future__ import annotations

import json
import os

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


def read_json(path: str, what: str):
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
    """Train the defect tagger (an SAE on the pool's embeddings, its latents named from
    labelled defects and styles) and the synthetic-image probe; writes
    OUT/filters/{tagger.safetensors, probe.safetensors}."""
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
    # The SAE z-scores each embedding dimension itself (data/sae.py): one tower's embeddings
    # share a large common direction, and the defects live in the small ones.
    rows = np.concatenate([real, *groups.values()])
    sae, history = train_sae(np.concatenate([np.asarray(pool), rows]), embedding=embedder.meta(), **payload["sae"])
    bounds = np.cumsum([len(real)] + [len(e) for e in groups.values()])
    masks = {}
    for name, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
        masks[name] = np.zeros(len(rows), bool)
        masks[name][lo:hi] = True
    clean = np.zeros(len(rows), bool)
    clean[:len(real)] = True
    tagger = fit_tagger(sae, rows, masks, clean, defects, styles)
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
    info = read_json(os.path.join(out, "items", f"{name}.json"), "the chunk's item list")
    defect, d_score, d_reason = tagger.decide(emb, meta)
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
        kept = set(read_json(os.path.join(out, "kept", f"{name}.json"), "the chunk's filter result"))
        ks, emb, _ = read_chunk(chunk_path(os.path.join(out, store), name))
        take = [i for i, k in enumerate(ks) if k in kept]
        keys += [ks[i] for i in take]
        embs.append(np.asarray(emb)[take])
        info.update(read_json(os.path.join(out, "items", f"{name}.json"), "the chunk's item list"))
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
    kept = read_json(os.path.join(out, "dedup.json"), "the dedup result")
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
