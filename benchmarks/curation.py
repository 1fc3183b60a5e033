"""Curation at scale on CPU: hierarchical k-means, balanced sampling and dedup on N x 768 embeddings.

Synthetic embeddings with the structure curation is for: 1000 concepts under 40
super-concepts, concept sizes Zipf (the largest 1000x the smallest), points unit
vectors at cosine ~0.74 to each other within a concept, ~0.4 within a super-concept,
~0 across. Planted on top: 0.5% exact copies (same row, same hash) and 1% near copies
(the row plus noise, another hash; half at cosine ~0.9998, half at ~0.970, just above
the 0.95 threshold, where an approximate index misses first).

    python benchmarks/curation.py                                  # 1M x 768: ~8 min on 2 cores
    python benchmarks/curation.py --n 100000 --levels 1000,200,40,8 --dedup-n 20000 --flat-n 0   # quick

Measured: each level of hierarchical k-means (data/clusters.py), balanced weights and
subsets (data/balance.py) with how flat they make the per-concept histogram against
uniform sampling, dedup (data/dedup.py) items/s with the IVF index at each --dedup-n
and the exact index at --flat-n, its recall of the planted copies and of the flat
index's pairs, and SHA-256 throughput on decoded 512² RGB pixels.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from data.balance import balanced_subset, balanced_weights, gap_report
from data.clusters import HierarchyConfig, build_hierarchy, load_faiss, openblas_core
from data.dedup import deduplicate, exact_duplicates, pixel_hash

ROOT = Path(__file__).resolve().parents[1]


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_embeddings(n: int, dim: int, concepts: int, supers: int, seed: int, exact: float = 0.005,
                    near: float = 0.01) -> dict:
    """n unit rows: [base | exact copies | near copies], the copies' originals drawn from the base."""
    rng = np.random.default_rng(seed)
    n_exact, n_near = int(n * exact), int(n * near)
    n_base = n - n_exact - n_near
    p = 1.0 / np.arange(1, concepts + 1)
    sizes = np.maximum(1, np.floor(p / p.sum() * n_base).astype(np.int64))
    sizes[0] += n_base - sizes.sum()
    concept = np.repeat(np.arange(concepts), sizes)
    super_dir = _unit(rng.standard_normal((supers, dim)))
    centre = _unit(super_dir[rng.integers(supers, size=concepts)] + 0.9 * _unit(rng.standard_normal((concepts, dim))))
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n_base, 100_000):  # chunks: the noise is the big temporary
        stop = min(n_base, start + 100_000)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
        emb[start:stop] = _unit(centre[concept[start:stop]].astype(np.float32) + noise)
    originals = rng.choice(n_base, n_exact + n_near, replace=False)
    emb[n_base:n_base + n_exact] = emb[originals[:n_exact]]
    # half the near copies barely changed (cosine ~0.9998), half re-edited (~0.970, near the threshold)
    scale = np.where(np.arange(n_near) % 2 == 0, 0.02, 0.25).astype(np.float32)[:, None] / np.sqrt(dim)
    noise = rng.standard_normal((n_near, dim), dtype=np.float32) * scale
    emb[n_base + n_exact:] = _unit(emb[originals[n_exact:]] + noise)
    copy_of = np.full(n, -1, np.int64)
    copy_of[n_base:] = originals
    hashes = [f"{i:x}" for i in range(n)]
    for i in range(n_base, n_base + n_exact):
        hashes[i] = hashes[copy_of[i]]
    return {"emb": emb, "concept": np.concatenate([concept, concept[originals]]), "copy_of": copy_of,
            "hashes": hashes, "keys": [f"img/{i:07d}" for i in range(n)], "n_base": n_base,
            "n_exact": n_exact}


def bench_hierarchy(emb: np.ndarray, levels: list[int], iters: int, mppc: int, seed: int):
    marks = [time.perf_counter()]
    lines = []

    def log(line):
        marks.append(time.perf_counter())
        lines.append(line)
        print(f"  {line} ({marks[-1] - marks[-2]:.1f}s)", flush=True)

    cfg = HierarchyConfig(clusters=levels, iters=iters, max_points_per_centroid=mppc, seed=seed)
    h = build_hierarchy(emb, cfg, log=log)
    per_level = [round(b - a, 1) for a, b in zip(marks, marks[1:])]
    return h, {"levels": levels, "iters": iters, "max_points_per_centroid": mppc,
               "level_seconds": per_level, "seconds": round(marks[-1] - marks[0], 1),
               "clusters": [h.num_clusters(lv) for lv in range(1, h.num_levels + 1)],
               "empty_removed": [lv["empty_removed"] for lv in h.meta["levels"]],
               "resample_steps": [lv["resample_steps"] for lv in h.meta["levels"]]}


def flatness(counts: np.ndarray, sizes: np.ndarray, head: int) -> dict:
    """How a per-concept histogram of draws spreads: the share of the `head` largest concepts,
    of the smaller half (50% under uniform-over-concepts), the concepts not drawn, and those
    under half the uniform-over-concepts share."""
    order = np.argsort(-sizes, kind="stable")
    total = counts.sum()
    return {"head_share": round(float(counts[order[:head]].sum() / total), 4),
            "tail_half_share": round(float(counts[order[len(order) // 2:]].sum() / total), 4),
            "concepts_not_drawn": int((counts == 0).sum()),
            "under_half_of_uniform": sum(r["under"] for r in gap_report(np.arange(len(counts)), counts))}


def bench_balance(h, concept: np.ndarray, budget: int) -> dict:
    t0 = time.perf_counter()
    w = balanced_weights(h, budget)
    t_w = time.perf_counter() - t0
    t0 = time.perf_counter()
    subset = balanced_subset(h, budget, strategy="random")
    t_r = time.perf_counter() - t0
    t0 = time.perf_counter()
    balanced_subset(h, budget, strategy="closest")
    t_c = time.perf_counter() - t0
    sizes = np.bincount(concept)
    head = max(1, len(sizes) // 100)
    uniform = sizes * (budget / len(concept))
    return {"budget": budget, "weights_seconds": round(t_w, 2), "subset_random_seconds": round(t_r, 2),
            "subset_closest_seconds": round(t_c, 2), "head_concepts": head,
            "uniform": flatness(uniform, sizes, head),
            "balanced_weights": flatness(np.bincount(concept, weights=w, minlength=len(sizes)), sizes, head),
            "balanced_subset": flatness(np.bincount(concept[subset], minlength=len(sizes)).astype(float), sizes,
                                        head)}


def bench_dedup(data: dict, n: int, index: str, threshold: float, nprobe: int, reference=None) -> tuple[dict, set]:
    keys, hashes, emb = data["keys"], data["hashes"], data["emb"]
    assert n == len(keys), "a set is deduplicated whole: its copies point into it"
    t0 = time.perf_counter()
    result = deduplicate(keys, hashes, emb, threshold, index=index, nprobe=nprobe, flat_max=n)
    seconds = time.perf_counter() - t0
    dropped = set(np.flatnonzero(~result.kept).tolist())
    planted = set(np.flatnonzero(data["copy_of"] >= 0).tolist())
    hard = set(range(data["n_base"] + data["n_exact"] + 1, n, 2))  # the near copies at cosine ~0.970
    row = {"n": n, "index": index, "nprobe": nprobe if index == "ivf" else None, "seconds": round(seconds, 1),
           "items_per_s": round(n / seconds), "planted": len(planted), "found": len(dropped & planted),
           "recall_planted": round(len(dropped & planted) / len(planted), 5),
           "recall_near_0.97": round(len(dropped & hard) / len(hard), 5), "dropped_not_planted": len(dropped - planted)}
    if reference is not None:
        row["recall_vs_flat"] = round(len(dropped & reference) / max(1, len(reference)), 5)
    return row, dropped


def bench_hash(images: int, side: int, n: int) -> dict:
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(8)]
    t0 = time.perf_counter()
    for i in range(images):
        pixel_hash(pool[i % len(pool)])
    t_hash = time.perf_counter() - t0
    hashes = [f"{i % (n - n // 200):x}" for i in range(n)]  # 0.5% repeats
    keys = [f"img/{i:07d}" for i in range(n)]
    t0 = time.perf_counter()
    exact_duplicates(keys, hashes)
    t_group = time.perf_counter() - t0
    mb = images * side * side * 3 / 1e6
    return {"image": f"{side}x{side}x3 uint8", "images": images, "images_per_s": round(images / t_hash),
            "MB_per_s": round(mb / t_hash), "group_n": n, "group_items_per_s": round(n / t_group)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--supers", type=int, default=40)
    p.add_argument("--levels", default="5000,1000,200,40", help="clusters per level, finest first")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--max-points-per-centroid", type=int, default=64, help="level-1 training sample per centroid")
    p.add_argument("--budget", type=int, default=0, help="balanced draws (default n / 10)")
    p.add_argument("--dedup-n", default="100000,1000000", help="IVF dedup sizes (the largest may be --n: reused)")
    p.add_argument("--flat-n", type=int, default=100_000, help="exact-index dedup size (0: skip)")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--nprobe-sweep", default="1,16", help="extra nprobe values at the smallest --dedup-n")
    p.add_argument("--hash-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", default=str(ROOT / "benchmarks/results/curation_cpu.json"))
    args = p.parse_args()
    load_faiss()
    levels = [int(k) for k in args.levels.split(",")]
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    data = make_embeddings(args.n, args.dim, args.concepts, args.supers, args.seed)
    print(f"{args.n} x {args.dim} embeddings, {args.concepts} Zipf concepts, in {time.perf_counter() - t0:.1f}s")
    print(f"hierarchical k-means {' -> '.join(map(str, [args.n] + levels))}:")
    h, hkm = bench_hierarchy(data["emb"], levels, args.iters, args.max_points_per_centroid, args.seed)
    bal = bench_balance(h, data["concept"], args.budget or args.n // 10)
    del h

    dedup = []
    flat_pairs = None
    if args.flat_n:
        small = make_embeddings(args.flat_n, args.dim, args.concepts, args.supers, args.seed + 1)
        row, flat_pairs = bench_dedup(small, args.flat_n, "flat", args.threshold, args.nprobe)
        dedup.append(row)
        print(f"  dedup {args.flat_n} flat: {row['seconds']}s", flush=True)
    sizes = [int(v) for v in args.dedup_n.split(",") if v]
    for n in sizes:
        if n == args.flat_n:
            pool, reference = small, flat_pairs
        elif n == args.n:
            pool, reference = data, None
        else:
            pool, reference = make_embeddings(n, args.dim, args.concepts, args.supers, args.seed + 2), None
        sweep = [int(v) for v in args.nprobe_sweep.split(",") if v] if n == min(sizes) else []
        for nprobe in sorted({args.nprobe, *sweep}):
            row, _ = bench_dedup(pool, n, "ivf", args.threshold, nprobe, reference=reference)
            dedup.append(row)
            print(f"  dedup {n} ivf nprobe {nprobe}: {row['seconds']}s", flush=True)
    hashing = bench_hash(args.hash_images, 512, args.n)

    faiss = load_faiss()
    result = {"what": "hierarchical k-means, balanced sampling, dedup on synthetic clustered embeddings",
              "n": args.n, "dim": args.dim, "concepts": args.concepts, "supers": args.supers,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "faiss": faiss.__version__,
              "faiss_threads": faiss.omp_get_max_threads(),
              "openblas_core": os.environ.get("OPENBLAS_CORETYPE") or openblas_core(),
              "hierarchical_kmeans": hkm, "balanced": bal, "dedup": dedup, "hash": hashing,
              "threshold": args.threshold, "total_seconds": round(time.perf_counter() - t_all, 1)}

    print(f"\nhierarchical k-means: {hkm['seconds']}s, per level {hkm['level_seconds']}, clusters {hkm['clusters']}")
    print(f"balanced sampling, budget {bal['budget']}: weights {bal['weights_seconds']}s, subset "
          f"{bal['subset_random_seconds']}s (random) / {bal['subset_closest_seconds']}s (closest)")
    print(f"{'per-concept draws':<18} {'head 1% share':>14} {'tail half share':>16} {'not drawn':>10}")
    for name in ("uniform", "balanced_weights", "balanced_subset"):
        f = bal[name]
        print(f"{name:<18} {f['head_share']:>14.1%} {f['tail_half_share']:>16.1%} {f['concepts_not_drawn']:>10}")
    print(f"{'dedup':<6} {'n':>8} {'index':>6} {'nprobe':>6} {'s':>7} {'items/s':>9} {'recall':>8} "
          f"{'at 0.97':>8} {'vs flat':>8} {'false':>6}")
    for r in dedup:
        print(f"{'':<6} {r['n']:>8} {r['index']:>6} {str(r['nprobe'] or '-'):>6} {r['seconds']:>7} "
              f"{r['items_per_s']:>9} {r['recall_planted']:>8} {r['recall_near_0.97']:>8} "
              f"{str(r.get('recall_vs_flat', '-')):>8} {r['dropped_not_planted']:>6}")
    print(f"sha256 of {hashing['image']} pixels: {hashing['images_per_s']} images/s ({hashing['MB_per_s']} MB/s); "
          f"grouping {hashing['group_n']} hashes: {hashing['group_items_per_s']} items/s")
    print(f"total {result['total_seconds']}s")
    os.makedirs(os.path.dirname(args.result), exist_ok=True)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
