"""Deduplication: exact copies by content hash, near copies by cosine similarity of embeddings (FAISS).

    hashes = [image_hash(p) for p in paths]               # sha256 of the decoded RGB pixels
    result = deduplicate(keys, hashes, emb_ND, threshold=0.95)
    result.kept                                          # (N,) bool
    result.records()                                     # one dict per input for lineage

Exact copies are found by the SHA-256 of the *decoded pixels* (RGB uint8, with the
shape), not of the file bytes: the same picture saved twice with other metadata
(EXIF, ICC profile stripped), another PNG compression level or another container
is a different file but the same training sample. What the trainer sees is the
decoded image, so that is what is compared. `file_hash` (bytes) is there for inputs
one cannot afford to decode; it finds a subset of what `image_hash` finds. A lossy
re-encode changes the pixels: that is the near-duplicate stage's job.

Near copies: embeddings are L2-normalised so the inner product is the cosine; every
pair above `threshold` is an edge (FAISS range search), and the connected components
of those edges (union-find) are the groups. A chain a~b~c puts a and c in one group
even when a and c are below the threshold: one image re-edited by small steps is one
image. The kept item of a group is the one with the smallest key, so the choice
depends only on the set of inputs, not on their order or on thread timing.

The index: exact (flat) search below `flat_max` items, O(N²) distance work; above
it an IVF index (nlist ≈ 2√N lists, `nprobe` of them searched per query), about
N²·nprobe/nlist work. IVF compares an item only with the items of the `nprobe`
lists whose centroids are nearest to it, so a pair whose partner sits in another
list is missed (recall below 1, measured on planted copies and against flat search
in benchmarks/curation.py). A near copy lies very close to its original, so nearly
always in the same list or a neighbouring one; a pair just above the threshold is
the one most likely to be missed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.clusters import load_faiss

# Queries per range-search call: bounds the memory of the result lists.
QUERY_CHUNK = 65536


def pixel_hash(pixels) -> str:
    """SHA-256 of an image's pixels: dtype and shape, then the C-order bytes (so a 2x8 and
    a 4x4 image of the same bytes differ)."""
    a = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


def image_hash(path: str) -> str:
    """pixel_hash of the image at `path` decoded to RGB uint8 (what the trainer sees).
    ValueError naming the file if it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return pixel_hash(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be decoded as an image ({e})") from None


def file_hash(path: str) -> str:
    """SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class DedupResult:
    keys: list[str]
    kept: np.ndarray            # bool (N,)
    group: np.ndarray           # int64 (N,): group id; groups numbered in their kept key's order
    representative: list[str]   # (N,) the kept key of the item's group (the item itself when kept)
    duplicate_of: list[str]     # (N,) what the item matched at the stage that dropped it ('' when kept)
    similarity: np.ndarray      # float32 (N,): cosine to the representative (1.0 for itself, for exact copies
                                # without embeddings); the score of the lineage record
    stage: list[str]            # (N,) '' kept, 'exact' or 'near': the stage that dropped it
    threshold: float | None = None

    @property
    def num_dropped(self) -> int:
        return int((~self.kept).sum())

    def reason(self, i: int, group_sizes: np.ndarray | None = None) -> str:
        if self.kept[i]:
            size = int((self.group == self.group[i]).sum() if group_sizes is None else group_sizes[self.group[i]])
            return "unique" if size == 1 else f"kept: smallest key of a group of {size}"
        if self.stage[i] == "exact":
            text = f"exact duplicate of {self.duplicate_of[i]} (same content hash)"
            if self.duplicate_of[i] != self.representative[i]:
                text += f", itself a near duplicate of {self.representative[i]}"
            return text
        s = float(self.similarity[i])
        if s > self.threshold:
            return f"near duplicate of {self.representative[i]} (cosine {s:.4f} > {self.threshold})"
        return (f"near duplicate of {self.representative[i]} through a chain of pairs above {self.threshold} "
                f"(cosine to it {s:.4f})")

    def records(self) -> list[dict]:
        """One JSON-able record per input, in input order: key, kept, group, representative,
        stage, score (the similarity) and reason."""
        sizes = np.bincount(self.group)
        return [{"key": k, "kept": bool(self.kept[i]), "group": int(self.group[i]),
                 "representative": self.representative[i], "stage": self.stage[i] or None,
                 "score": round(float(self.similarity[i]), 6), "reason": self.reason(i, sizes)}
                for i, k in enumerate(self.keys)]

    def summary(self) -> str:
        exact = sum(s == "exact" for s in self.stage)
        near = sum(s == "near" for s in self.stage)
        return (f"dedup: {len(self.keys)} inputs, kept {int(self.kept.sum())}, dropped {exact} exact and {near} near "
                f"duplicates in {len(np.unique(self.group[~self.kept]))} groups")


def _check_keys(keys) -> list[str]:
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"key {dup!r} occurs more than once: dedup needs one key per input")
    return keys


def _normalised(keys: list[str], emb_ND) -> np.ndarray:
    x = np.array(emb_ND, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2 or len(x) != len(keys):
        raise ValueError(f"embeddings of shape {x.shape} for {len(keys)} keys: expected ({len(keys)}, D)")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise ValueError(f"{len(bad)} embeddings are zero or not finite (first: key {keys[bad[0]]!r}); "
                         "they have no direction to compare")
    x /= norms[:, None]
    return x


def _components(n: int, i_E: np.ndarray, j_E: np.ndarray) -> np.ndarray:
    """Union-find over edges (i, j): each node's root, the smallest index of its component
    (a union hangs the larger root under the smaller, and path halving only moves a node
    to a smaller ancestor, so every pointer goes down in index)."""
    p = list(range(n))  # Python ints: per-edge numpy scalar indexing would dominate

    def find(a: int) -> int:
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    for a, b in zip(i_E.tolist(), j_E.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            p[max(ra, rb)] = min(ra, rb)
    root = np.array(p, dtype=np.int64)
    while True:  # the remaining paths, by pointer jumping
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def similar_pairs(x_ND: np.ndarray, threshold: float, index: str = "auto", flat_max: int = 20000,
                  nlist: int | None = None, nprobe: int = 4, train_per_list: int = 32,
                  seed: int = 0) -> tuple[np.ndarray, ...]:
    """Pairs (i < j) of unit vectors with inner product > threshold: int64 i, int64 j, float32 cosine.

    index: 'flat' (exact, FAISS range search), 'ivf' (approximate, see the module docstring)
    or 'auto' (flat up to flat_max rows)."""
    if index == "auto":
        index = "flat" if len(x_ND) <= flat_max else "ivf"
    if index == "flat":
        return _flat_pairs(x_ND, threshold)
    if index == "ivf":
        return _ivf_pairs(x_ND, threshold, nlist, nprobe, train_per_list, seed)
    raise ValueError(f"index={index!r} is not one of ['auto', 'flat', 'ivf']")


def _flat_pairs(x_ND: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    faiss = load_faiss()
    search = faiss.IndexFlatIP(x_ND.shape[1])
    search.add(x_ND)
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(x_ND), QUERY_CHUNK):
        lims, sims, ids = search.range_search(x_ND[start:start + QUERY_CHUNK], threshold)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = ids > rows  # each pair once, not the item itself
        out_i.append(rows[keep])
        out_j.append(ids[keep].astype(np.int64))
        out_s.append(sims[keep])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32)


def _ivf_pairs(x_ND: np.ndarray, threshold: float, nlist: int | None, nprobe: int, train_per_list: int,
               seed: int) -> tuple[np.ndarray, ...]:
    """The IVF search as a self-join: each item is stored in the list of its nearest coarse
    centroid and compared with the items stored in its `nprobe` nearest lists (what FAISS's
    IndexIVFFlat range search with that nprobe compares), but list by list as one matrix
    product of the list's queries by its items. FAISS's per-query scan reads every list
    once per query at ~12 GFLOP/s on 2 cores; the product runs at BLAS speed.

    Coarse centroids: spherical k-means (FAISS) of 10 iterations on a seeded sample of
    train_per_list points per list; they only route queries, they need not be good
    clusters. nlist defaults to 2√N: the join costs ~nprobe·N²/nlist, the assignment N·nlist."""
    faiss = load_faiss()
    n, d = x_ND.shape
    nlist = max(1, min(n // 4, nlist or int(2 * np.sqrt(n))))
    km = faiss.Kmeans(d, nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=train_per_list,
                      min_points_per_centroid=1, verbose=False)
    km.train(x_ND)
    coarse = faiss.IndexFlatIP(d)
    coarse.add(km.centroids)
    _, probe_NP = coarse.search(x_ND, min(nprobe, nlist))
    home = probe_NP[:, 0]
    stored = np.argsort(home, kind="stable")
    stored_bounds = np.searchsorted(home[stored], np.arange(nlist + 1))
    asking = np.argsort(probe_NP.reshape(-1), kind="stable")  # (item, probe) slots by list
    ask_bounds = np.searchsorted(probe_NP.reshape(-1)[asking], np.arange(nlist + 1))
    asking //= probe_NP.shape[1]  # slot -> item
    out_i, out_j, out_s = [], [], []
    for lst in range(nlist):
        items = stored[stored_bounds[lst]:stored_bounds[lst + 1]]
        queries = asking[ask_bounds[lst]:ask_bounds[lst + 1]]
        if len(items) == 0 or len(queries) == 0:
            continue
        base_DK = x_ND[items].T
        step = max(1, (1 << 24) // len(items))  # bounds the similarity block to 64 MB
        for start in range(0, len(queries), step):
            q = queries[start:start + step]
            sim_QK = x_ND[q] @ base_DK
            qi, kj = np.nonzero(sim_QK > threshold)
            a, b = q[qi], items[kj]
            keep = a != b
            out_i.append(np.minimum(a, b)[keep])
            out_j.append(np.maximum(a, b)[keep])
            out_s.append(sim_QK[qi, kj][keep])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, sim = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)
    # a pair of two lists is found from both sides when each probes the other's list
    _, first = np.unique(i * n + j, return_index=True)
    return i[first].astype(np.int64), j[first].astype(np.int64), sim[first].astype(np.float32)


def _cosine_to(x_ND: np.ndarray, rep: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """float32 (N,): each item's cosine to its representative (1 for the kept ones)."""
    sim = np.ones(len(rep), np.float32)
    dropped = np.flatnonzero(~kept)
    sim[dropped] = np.einsum("nd,nd->n", x_ND[dropped], x_ND[rep[dropped]])
    return sim


def _key_order(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(order, pos): the inputs sorted by key, and each input's position in that order."""
    order = np.argsort(np.array(keys, dtype=str), kind="stable")
    pos = np.empty(len(keys), np.int64)
    pos[order] = np.arange(len(keys))
    return order, pos


def _grouped(keys: list[str], root_sorted: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From each sorted position's root (a sorted position), per input: its representative's
    input index and its group id (groups numbered in the representative's key order)."""
    n = len(keys)
    rep = np.empty(n, np.int64)
    rep[order] = order[root_sorted]
    _, group_sorted = np.unique(root_sorted, return_inverse=True)
    group = np.empty(n, np.int64)
    group[order] = group_sorted.reshape(-1)
    return rep, group


def exact_duplicates(keys, hashes) -> DedupResult:
    """Groups of equal hashes; the smallest key of each is kept."""
    keys = _check_keys(keys)
    if len(hashes) != len(keys):
        raise ValueError(f"{len(hashes)} hashes for {len(keys)} keys")
    order, _ = _key_order(keys)
    first: dict[str, int] = {}
    root_sorted = np.empty(len(keys), np.int64)
    for pos, i in enumerate(order.tolist()):
        root_sorted[pos] = first.setdefault(hashes[i], pos)
    rep, group = _grouped(keys, root_sorted, order)
    kept = rep == np.arange(len(keys))
    reps = [keys[r] for r in rep.tolist()]
    return DedupResult(keys, kept, group, reps, [("" if k else r) for k, r in zip(kept, reps)],
                       np.ones(len(keys), np.float32), ["" if k else "exact" for k in kept])


def near_duplicates(keys, emb_ND, threshold: float = 0.95, **index_kw) -> DedupResult:
    """Connected groups of cosine similarity > threshold; the smallest key of each is kept.
    index_kw: similar_pairs' index, flat_max, nlist, nprobe, train_per_list, seed."""
    keys = _check_keys(keys)
    return _near(keys, _normalised(keys, emb_ND), threshold, **index_kw)


def _near(keys: list[str], x_ND: np.ndarray, threshold: float, **index_kw) -> DedupResult:
    if not -1.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold}: a cosine similarity in [-1, 1)")
    order, pos = _key_order(keys)
    i_E, j_E, _ = similar_pairs(x_ND, threshold, **index_kw)
    root_sorted = _components(len(keys), pos[i_E], pos[j_E])
    rep, group = _grouped(keys, root_sorted, order)
    kept = rep == np.arange(len(keys))
    sim = _cosine_to(x_ND, rep, kept)
    reps = [keys[r] for r in rep.tolist()]
    return DedupResult(keys, kept, group, reps, [("" if k else r) for k, r in zip(kept, reps)], sim,
                       ["" if k else "near" for k in kept], threshold)


def deduplicate(keys, hashes=None, emb_ND=None, threshold: float = 0.95, **index_kw) -> DedupResult:
    """Exact stage (where hashes are given), then the near stage (where embeddings are) on
    the exact stage's survivors. An exact copy's representative is its group's final kept
    item; its stage stays 'exact' and duplicate_of names the copy it matched."""
    keys = _check_keys(keys)
    if hashes is None and emb_ND is None:
        raise ValueError("deduplicate needs hashes, embeddings or both")
    if hashes is None:
        return near_duplicates(keys, emb_ND, threshold, **index_kw)
    exact = exact_duplicates(keys, hashes)
    if emb_ND is None:
        return exact
    x = _normalised(keys, emb_ND)
    survivors = np.flatnonzero(exact.kept)
    sub = x if len(survivors) == len(keys) else x[survivors]
    near = _near([keys[i] for i in survivors.tolist()], sub, threshold, **index_kw)
    del sub
    index_of = {k: i for i, k in enumerate(keys)}
    rep_final = np.arange(len(keys))
    rep_final[survivors] = [index_of[k] for k in near.representative]  # survivor -> its kept input
    rep = rep_final[[index_of[k] for k in exact.representative]]  # an exact copy follows its original
    kept = rep == np.arange(len(keys))
    _, pos = _key_order(keys)
    group = np.unique(pos[rep], return_inverse=True)[1].reshape(-1).astype(np.int64)
    sim = _cosine_to(x, rep, kept)
    stage = ["" if kept[i] else ("exact" if not exact.kept[i] else "near") for i in range(len(keys))]
    dup_of = ["" if kept[i] else (exact.duplicate_of[i] if stage[i] == "exact" else keys[rep[i]])
              for i in range(len(keys))]
    return DedupResult(keys, kept, group, [keys[r] for r in rep.tolist()], dup_of, sim, stage, threshold)
