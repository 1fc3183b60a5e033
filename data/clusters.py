"""Hierarchical k-means with FAISS: concepts at several scales, for balanced sampling (data/balance.py).

The method is the public one of Vo et al. 2024 ("Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach", ssl-data-curation): level 1
clusters the embeddings, level l+1 clusters level l's centroids. Plain k-means puts
centroids where the data is dense, so a concept with a million near-identical images
gets hundreds of centroids and a rare one shares a centroid with its neighbours.
The resampling steps counter this: take the `n` points closest to each centroid
(the same number from every cluster, dense or not), run k-means afresh (new k-means++
seeds) on that union, reassign every point, repeat R times. Every cluster weighs the
same in the union, so a dense region no longer holds centroids by its mass alone:
centroids spread over the support (tests/data/test_clusters.py: 11-13 of 50 centroids
on a core holding 90% of the points but ~2% of the area, 3-4 after five steps).
Seeding afresh matters: started from the current centroids, k-means on the union only
moves each centroid to its own core and nothing spreads.

    cfg = HierarchyConfig(clusters=[5000, 1000, 200, 40])   # finest level first
    h = build_hierarchy(emb_ND, cfg, keys=keys)
    h.labels(4)                       # (N,) top-level cluster of each point
    h.save("runs/curate/hierarchy")   # hierarchy.npz + hierarchy.json
    h = Hierarchy.load("runs/curate/hierarchy", dim=768)

Levels are numbered 1 (finest, clusters of points) to L (top). A cluster left
without points after the final assignment is removed (ids renumbered, order kept)
and counted in `meta["levels"][l - 1]["empty_removed"]`: an empty cluster has no
samples to give a budget to, and the level above must not see its centroid.

File format (`k2train-hierarchy/1`), a folder with two files:

    hierarchy.json   {"format", "num_points", "dim", "clusters": [K_1..K_L], "config", "levels": [...]}
    hierarchy.npz    labels int32 (N,)        level-1 cluster of each point
                     dist float32 (N,)        squared L2 distance to that centroid
                     centroids_<l> float32 (K_l, D), l = 1..L
                     parents_<l> int32 (K_l,) level-(l+1) cluster of each level-l cluster, l = 1..L-1
                     keys <U (N,)             optional: each point's input key
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "k2train-hierarchy/1"
# k-means++ seeding costs one pass over the points per centroid; above this many
# point x centroid pairs it is left to FAISS's random seeding (level 1 of a large set).
KMEANS_PP_MAX_PAIRS = 2e7


def openblas_core() -> str | None:
    """The OpenBLAS kernel family this CPU runs, from its flags; None where unknown."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "SkylakeX"
    if {"avx2", "fma"} <= set(flags):
        return "Haswell"
    return None


def load_faiss():
    """The faiss module, its bundled OpenBLAS told which kernels this CPU runs.

    The faiss-cpu wheel ships OpenBLAS 0.3.15, which does not recognise recent Xeons
    (the dev machines report a generic "Intel Xeon Processor") and falls back to its
    SSE3 "Prescott" kernels: 20-28 GFLOP/s for the distance GEMM on 2 cores against
    ~240 with the AVX-512 ones. OpenBLAS reads OPENBLAS_CORETYPE once, when the library
    loads, so it is set (only where unset, only to a family the CPU's flags show) for
    the import and restored after, leaving other processes' OpenBLAS to detect for
    themselves."""
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    core = None if "OPENBLAS_CORETYPE" in os.environ else openblas_core()
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        if core:
            del os.environ["OPENBLAS_CORETYPE"]
    return faiss


@dataclass
class HierarchyConfig:
    # Clusters per level, finest first; each level clusters the one below's centroids,
    # so K_1 > K_2 > ... (ssl-data-curation uses ratios of 5-10 between levels).
    clusters: list[int] = field(default_factory=lambda: [5000, 1000, 200, 40])
    # Lloyd iterations of every k-means run (the first and each resampling step's).
    iters: int = 20
    # Resampling steps R per level. None: none at level 1 (a k-means over all points per
    # step; ssl-data-curation skips it there for cost too), 10 above.
    resample_steps: list[int] | None = None
    # Points n taken from each cluster per resampling step. None: half the mean cluster
    # size at that level (at least 1), the paper's choice.
    resample_size: list[int] | None = None
    # Level 1 trains on at most K_1 x this many points (FAISS's seeded subsample), then
    # assigns all of them: training cost stays fixed as the data grows.
    max_points_per_centroid: int = 256
    seed: int = 0

    def per_level(self) -> tuple[list[int], list[int | None]]:
        levels = len(self.clusters)
        if levels < 1 or any(int(k) < 1 for k in self.clusters):
            raise ValueError(f"clusters={self.clusters}: give one positive cluster count per level, finest first")
        steps = self.resample_steps if self.resample_steps is not None else [0] + [10] * (levels - 1)
        sizes = self.resample_size if self.resample_size is not None else [None] * levels
        for name, v in (("resample_steps", steps), ("resample_size", sizes)):
            if len(v) != levels:
                raise ValueError(f"{name}={v} has {len(v)} entries for {levels} levels (clusters={self.clusters})")
        return [int(s) for s in steps], list(sizes)


@dataclass
class Hierarchy:
    centroids: list[np.ndarray]      # [l-1]: float32 (K_l, D)
    labels_N: np.ndarray             # int32 (N,): level-1 cluster of each point
    dist_N: np.ndarray               # float32 (N,): squared L2 distance to its level-1 centroid
    parents: list[np.ndarray]        # [l-1]: int32 (K_l,): its level-(l+1) cluster, l = 1..L-1
    keys: np.ndarray | None = None   # <U (N,): input keys, where known
    meta: dict = field(default_factory=dict)

    @property
    def num_levels(self) -> int:
        return len(self.centroids)

    @property
    def num_points(self) -> int:
        return len(self.labels_N)

    @property
    def dim(self) -> int:
        return self.centroids[0].shape[1]

    def num_clusters(self, level: int) -> int:
        return len(self.centroids[self._level(level) - 1])

    def _level(self, level: int) -> int:
        if not 1 <= level <= self.num_levels:
            raise ValueError(f"level {level}: the hierarchy has levels 1..{self.num_levels}")
        return level

    def labels(self, level: int) -> np.ndarray:
        """int64 (N,): each point's cluster at `level` (its level-1 cluster's ancestor)."""
        out = self.labels_N.astype(np.int64)
        for parent in self.parents[: self._level(level) - 1]:
            out = parent[out].astype(np.int64)
        return out

    def cluster_parents(self, level: int) -> np.ndarray:
        """int64 (K_level,): each level-`level` cluster's cluster at level + 1."""
        if self._level(level) == self.num_levels:
            raise ValueError(f"level {level} is the top level: its clusters have no parents")
        return self.parents[level - 1].astype(np.int64)

    def sizes(self, level: int) -> np.ndarray:
        """int64 (K_level,): points in each cluster of `level`."""
        return np.bincount(self.labels(level), minlength=self.num_clusters(level))

    def assign(self, emb_ND, where: str = "embeddings") -> np.ndarray:
        """int64 (M, L): the cluster at every level of new points (nearest level-1 centroid, then its ancestors)."""
        x = _as_points(emb_ND, where, dim=self.dim)
        labels, _ = _assign(x, self.centroids[0])
        out = [labels.astype(np.int64)]
        for parent in self.parents:
            out.append(parent[out[-1]].astype(np.int64))
        return np.stack(out, axis=1)

    def summary(self) -> str:
        rows = [f"hierarchy: {self.num_points} points of width {self.dim}, {self.num_levels} levels"]
        for level in range(1, self.num_levels + 1):
            sizes = self.sizes(level)
            info = self.meta.get("levels", [{}] * self.num_levels)[level - 1]
            rows.append(f"  level {level}: {len(sizes)} clusters (of {info.get('requested', len(sizes))} asked, "
                        f"{info.get('empty_removed', 0)} empty removed), sizes {sizes.min()}..{sizes.max()}, "
                        f"{info.get('resample_steps', 0)} resampling steps of {info.get('resample_size', '-')}")
        return "\n".join(rows)

    # ---- files -------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write hierarchy.npz then hierarchy.json into `folder`, each atomically (tmp + rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"labels": self.labels_N.astype(np.int32), "dist": self.dist_N.astype(np.float32)}
        for level, c in enumerate(self.centroids, 1):
            arrays[f"centroids_{level}"] = c.astype(np.float32)
        for level, p in enumerate(self.parents, 1):
            arrays[f"parents_{level}"] = p.astype(np.int32)
        if self.keys is not None:
            arrays["keys"] = np.asarray(self.keys, dtype=str)
        header = {"format": FORMAT, "num_points": self.num_points, "dim": self.dim,
                  "clusters": [len(c) for c in self.centroids], **self.meta}
        _atomic(folder / "hierarchy.npz", lambda f: np.savez(f, **arrays))
        _atomic(folder / "hierarchy.json", lambda f: f.write(json.dumps(header, indent=1).encode()))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, dim: int | None = None) -> "Hierarchy":
        """Read a folder written by save. ValueError naming the file for a missing, unreadable
        or inconsistent one, and for centroids of another width than `dim` (where given)."""
        folder = Path(folder)
        jpath, npath = folder / "hierarchy.json", folder / "hierarchy.npz"
        for p in (jpath, npath):
            if not p.is_file():
                raise ValueError(f"{p}: missing; a hierarchy folder holds hierarchy.json and hierarchy.npz "
                                 "(data.clusters.Hierarchy.save)")
        try:
            header = json.loads(jpath.read_text())
            ok = isinstance(header, dict) and header.get("format") == FORMAT
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{jpath}: not readable JSON ({e})") from None
        if not ok:
            raise ValueError(f"{jpath}: not a {FORMAT} header")
        try:  # a damaged zip fails in many ways (BadZipFile, EOFError, zlib.error, a bad .npy header)
            with np.load(npath, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{npath}: unreadable ({type(e).__name__}: {e})") from None
        meta = {k: v for k, v in header.items() if k not in ("format", "num_points", "dim", "clusters")}
        h = cls._from_arrays(arrays, header, meta, npath)
        if dim is not None and h.dim != dim:
            raise ValueError(f"{npath}: centroids are {h.dim} wide, the embeddings {dim}: this hierarchy was built "
                             "on another embedding model")
        return h

    @classmethod
    def _from_arrays(cls, arrays: dict, header: dict, meta: dict, npath: Path) -> "Hierarchy":
        clusters, n, d = header.get("clusters"), header.get("num_points"), header.get("dim")
        if not (isinstance(clusters, list) and isinstance(n, int) and isinstance(d, int)):
            raise ValueError(f"{npath.with_suffix('.json')}: clusters, num_points or dim missing")
        levels = len(clusters)
        need = ["labels", "dist"] + [f"centroids_{lv}" for lv in range(1, levels + 1)] + \
               [f"parents_{lv}" for lv in range(1, levels)]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ValueError(f"{npath}: arrays {missing} missing for the {levels} levels its .json names")
        for lv, k in enumerate(clusters, 1):
            c = arrays[f"centroids_{lv}"]
            if c.shape != (k, d) or not np.isfinite(c).all():
                raise ValueError(f"{npath}: centroids_{lv} is {c.shape}, expected ({k}, {d}) finite values")
        if arrays["labels"].shape != (n,) or arrays["dist"].shape != (n,):
            raise ValueError(f"{npath}: labels/dist hold {arrays['labels'].shape}/{arrays['dist'].shape}, "
                             f"expected ({n},)")
        checks = [("labels", arrays["labels"], clusters[0])] + \
                 [(f"parents_{lv}", arrays[f"parents_{lv}"], clusters[lv]) for lv in range(1, levels)]
        for name, a, bound in checks:
            if a.size and (a.min() < 0 or a.max() >= bound):
                raise ValueError(f"{npath}: {name} has values outside 0..{bound - 1}")
        for lv in range(1, levels):
            if arrays[f"parents_{lv}"].shape != (clusters[lv - 1],):
                raise ValueError(f"{npath}: parents_{lv} has {arrays[f'parents_{lv}'].shape} entries, expected "
                                 f"({clusters[lv - 1]},)")
        keys = arrays.get("keys")
        if keys is not None and keys.shape != (n,):
            raise ValueError(f"{npath}: {keys.shape} keys for {n} points")
        return cls([arrays[f"centroids_{lv}"] for lv in range(1, levels + 1)], arrays["labels"], arrays["dist"],
                   [arrays[f"parents_{lv}"] for lv in range(1, levels)], keys, meta)

    @classmethod
    def from_labels(cls, emb_ND, level_labels: list, keys=None) -> "Hierarchy":
        """A hierarchy of given nested partitions (level 1 first), centroids the member means.
        For planted structure and externally made clusters; ValueError if a level-l cluster
        spans two level-(l+1) clusters."""
        x = _as_points(emb_ND, "embeddings")
        labels = [np.unique(np.asarray(lab), return_inverse=True)[1].reshape(-1) for lab in level_labels]
        if any(len(lab) != len(x) for lab in labels):
            raise ValueError(f"level labels of lengths {[len(lab) for lab in labels]} for {len(x)} points")
        parents = []
        for lower, upper in zip(labels, labels[1:]):
            parent = np.full(lower.max() + 1, -1, np.int64)
            parent[lower] = upper
            if (parent[lower] != upper).any():
                raise ValueError("level labels are not nested: a cluster has points in two clusters of the level above")
            parents.append(parent.astype(np.int32))
        centroids = []
        for lab in labels:
            sums = np.zeros((lab.max() + 1, x.shape[1]), np.float64)
            np.add.at(sums, lab, x)
            centroids.append((sums / np.bincount(lab)[:, None]).astype(np.float32))
        dist = ((x - centroids[0][labels[0]]) ** 2).sum(1).astype(np.float32)
        return cls(centroids, labels[0].astype(np.int32), dist, parents,
                   None if keys is None else np.asarray(keys, dtype=str), {"source": "from_labels"})


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _as_points(emb_ND, where: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(emb_ND, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{where}: expected a non-empty (N, D) array of embeddings, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{where}: embeddings are {x.shape[1]} wide, the hierarchy's centroids {dim}")
    bad = np.flatnonzero(~np.isfinite(x).all(1))
    if len(bad):
        raise ValueError(f"{where}: {len(bad)} rows are not finite, first row {bad[0]}")
    return x


def _assign(x_ND: np.ndarray, c_KD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (exact, FAISS flat L2) and its squared distance for every point."""
    faiss = load_faiss()
    index = faiss.IndexFlatL2(c_KD.shape[1])
    index.add(np.ascontiguousarray(c_KD, dtype=np.float32))
    dist, labels = index.search(x_ND, 1)
    return labels[:, 0].astype(np.int64), np.maximum(dist[:, 0], 0).astype(np.float32)


def _kmeans_pp(x_ND: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): each next seed is the best of
    2 + ln k candidates drawn with P ∝ D² to the seeds so far (the one leaving the least
    total D²), so separated concepts each get a seed before any gets two; Lloyd's
    iterations cannot undo two seeds in one concept and none in its neighbour."""
    n = len(x_ND)
    norms_N = (x_ND.astype(np.float64) ** 2).sum(1)
    tries = 2 + int(np.log(k))

    def d2_to(idx: np.ndarray) -> np.ndarray:  # (len(idx), N): |x|² - 2 x·c + |c|²
        dots = (x_ND[idx] @ x_ND.T).astype(np.float64)
        return np.maximum(norms_N[None, :] - 2.0 * dots + norms_N[idx, None], 0.0)

    chosen = [int(rng.integers(n))]
    d2_N = d2_to(np.array(chosen))[0]
    for _ in range(1, k):
        total = d2_N.sum()
        if total <= 0:  # fewer distinct points than clusters: any point (its cluster stays empty)
            chosen.append(int(rng.integers(n)))
            continue
        cand = rng.choice(n, size=tries, p=d2_N / total)
        new_CN = np.minimum(d2_N[None, :], d2_to(cand))
        best = int(np.argmin(new_CN.sum(1)))
        chosen.append(int(cand[best]))
        d2_N = new_CN[best]
    return x_ND[chosen].copy()


def kmeans(x_ND: np.ndarray, k: int, iters: int, seed: int, init_KD: np.ndarray | None = None,
           max_points_per_centroid: int = 1 << 30) -> np.ndarray:
    """float32 (k, D) centroids of Lloyd's k-means (FAISS), from `init_KD`, else k-means++
    seeds where affordable, else FAISS's seeded random ones. Deterministic for a seed."""
    faiss = load_faiss()
    n, d = x_ND.shape
    if n < k:
        raise ValueError(f"k-means of {n} points into {k} clusters: fewer points than clusters")
    if init_KD is None and n * k <= KMEANS_PP_MAX_PAIRS:
        init_KD = _kmeans_pp(x_ND, k, np.random.default_rng(seed))
    # min_points_per_centroid=1: upper levels have few points per centroid by design.
    km = faiss.Kmeans(d, k, niter=iters, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      min_points_per_centroid=1, verbose=False)
    km.train(x_ND, init_centroids=None if init_KD is None else np.ascontiguousarray(init_KD, np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _closest_per_cluster(labels_N: np.ndarray, dist_N: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n points closest to their centroid in every cluster (all of a smaller one);
    ties by index, so the choice is a function of the assignment alone."""
    order = np.lexsort((np.arange(len(labels_N)), dist_N, labels_N))
    sorted_labels = labels_N[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.sort(order[rank < n])


def cluster_level(x_ND: np.ndarray, k: int, iters: int, steps: int, size: int | None, seed: int,
                  max_points_per_centroid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One level: k-means, then `steps` resampling steps of `size` closest points per cluster,
    then empty clusters removed. Returns (centroids (K', D), labels (N,), dist (N,), report)."""
    if len(x_ND) < k:
        raise ValueError(f"{k} clusters asked of {len(x_ND)} points; give fewer clusters at this level")
    centroids = kmeans(x_ND, k, iters, seed, max_points_per_centroid=max_points_per_centroid)
    labels, dist = _assign(x_ND, centroids)
    size = max(1, len(x_ND) // k // 2) if size is None else int(size)
    done = 0
    for step in range(steps):
        picked = _closest_per_cluster(labels, dist, size)
        if len(picked) < k:  # too few non-empty clusters to seed k centroids from their cores
            break
        centroids = kmeans(x_ND[picked], k, iters, seed + 1000 * (step + 1))
        labels, dist = _assign(x_ND, centroids)
        done += 1
    counts = np.bincount(labels, minlength=k)
    keep = np.flatnonzero(counts > 0)
    if len(keep) < k:
        remap = np.full(k, -1, np.int64)
        remap[keep] = np.arange(len(keep))
        centroids, labels = centroids[keep], remap[labels]
    report = {"requested": k, "clusters": len(keep), "empty_removed": int(k - len(keep)), "resample_steps": done,
              "resample_size": size if steps else None}
    return centroids, labels, dist, report


def build_hierarchy(emb_ND, cfg: HierarchyConfig | None = None, keys=None, log=None) -> Hierarchy:
    """Hierarchical k-means of `emb_ND` (N, D) per `cfg`. `log(str)` gets one line per level."""
    cfg = cfg or HierarchyConfig()
    steps, sizes = cfg.per_level()
    x = _as_points(emb_ND, "embeddings")
    if keys is not None and len(keys) != len(x):
        raise ValueError(f"{len(keys)} keys for {len(x)} embeddings")
    centroids, parents, reports = [], [], []
    inputs = x
    for level, k in enumerate(cfg.clusters, 1):
        mppc = cfg.max_points_per_centroid if level == 1 else 1 << 30
        c, labels, dist, report = cluster_level(inputs, int(k), cfg.iters, steps[level - 1], sizes[level - 1],
                                                cfg.seed + level, mppc)
        if level == 1:
            labels_N, dist_N = labels.astype(np.int32), dist
        else:
            parents.append(labels.astype(np.int32))
        centroids.append(c)
        reports.append({"level": level, **report})
        if log:
            log(f"level {level}: {len(inputs)} inputs -> {report['clusters']} clusters "
                f"({report['empty_removed']} empty removed, {report['resample_steps']} resampling steps)")
        inputs = c
    meta = {"config": asdict(cfg), "levels": reports}
    return Hierarchy(centroids, labels_N, dist_N, parents, None if keys is None else np.asarray(keys, dtype=str), meta)
