"""Cluster-balanced sampling over a Hierarchy (data/clusters.py), rare-entity priority, the gap report.

A web-scale image pool is a long tail: a few concepts (product shots, selfies) hold
most images, most concepts a handful. Sampling it uniformly trains on the head.
Balanced sampling (Vo et al. 2024, the ssl-data-curation method) splits a budget of
draws top-down: equally among the top-level clusters, each cluster's share equally
among its children, down to the leaves (level 1), then among a leaf's samples.
Splitting is water-filling: a cluster with less capacity than its equal share gets
all it has and its siblings split the rest, so the budget is always spent and no
sample is drawn more than its capacity.

    w = balanced_weights(h, budget=200_000)                    # float64 (N,), sums to the budget
    w = balanced_weights(h, 200_000, priority=entity_priority(captions, ["okapi", "axolotl"]))
    idx = balanced_subset(h, 200_000, strategy="closest")      # int64, sorted, no repeats
    rows = gap_report(h.labels(h.num_levels), w)               # vs uniform over top-level clusters
    print(format_gap_report(rows))

`balanced_weights` gives the expected number of draws of each sample in a budget of
`budget` draws: a loader that draws with P ∝ weight follows the balanced plan in
expectation, for any epoch length. The budget sets how flat the plan is: with
max_repeat=1 and budget = N every sample is drawn once (uniform again); balance comes
from a budget below N, or from repeats of the small clusters (max_repeat > 1).

Priority (rare entities): a sample's capacity is max_repeat x its priority multiplier,
and a leaf's budget is split among its samples in proportion to their multipliers. A
boosted sample draws more of its leaf's share, and a leaf made of rare samples
(smaller than its share) takes more of its parent's.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np

from data.clusters import Hierarchy


def water_fill(capacity, budget: float) -> np.ndarray:
    """float64 shares s_i = min(level, c_i) with Σ s_i = budget (all of c where budget >= Σ c)."""
    c = np.asarray(capacity, dtype=np.float64)
    if budget <= 0:
        return np.zeros_like(c)
    if budget >= c.sum():
        return c.copy()
    s = np.sort(c)
    prefix = np.concatenate([[0.0], np.cumsum(s)[:-1]])
    level = (budget - prefix) / np.arange(len(s), 0, -1)  # if the i smallest are taken whole
    i = int(np.argmax(level <= s))  # the first that is not
    return np.minimum(c, level[i])


def water_fill_int(capacity, budget: int, rng: np.random.Generator) -> np.ndarray:
    """int64 shares: water_fill rounded down, the leftover draws given one each to clusters
    with room above the level, chosen by `rng` (no cluster is favoured by its position)."""
    c = np.asarray(capacity, dtype=np.int64)
    if budget >= c.sum():
        return c.copy()
    level = int(np.floor(water_fill(c, budget).max()))
    base = np.minimum(c, level)
    room = np.flatnonzero(c > level)
    left = int(budget - base.sum())
    assert 0 <= left <= len(room), (left, len(room))
    base[rng.choice(room, left, replace=False)] += 1
    return base


def _top_down(h: Hierarchy, cap_K1: np.ndarray, budget, fill: Callable) -> np.ndarray:
    """Each level-1 cluster's share of `budget`, given its capacity: the top level's clusters
    by fill(their capacities, budget), then every cluster's share among its children."""
    caps = [cap_K1]
    for level, parent in enumerate(h.parents, 2):
        caps.append(np.bincount(parent, weights=caps[-1], minlength=h.num_clusters(level)).astype(cap_K1.dtype))
    share = fill(caps[-1], budget)
    for level in range(h.num_levels - 1, 0, -1):  # level's shares from level + 1's
        parent = h.parents[level - 1]
        order = np.argsort(parent, kind="stable")
        bounds = np.searchsorted(parent[order], np.arange(len(share) + 1))
        child = np.zeros(len(parent), dtype=share.dtype)
        for p in range(len(share)):
            kids = order[bounds[p]:bounds[p + 1]]
            child[kids] = fill(caps[level - 1][kids], share[p])
        share = child
    return share


def _priority(priority, n: int, boost: float) -> np.ndarray:
    if priority is None:
        return np.ones(n)
    p = np.asarray(priority)
    if p.shape != (n,):
        raise ValueError(f"priority of shape {p.shape} for a hierarchy of {n} samples: give one value per sample")
    if p.dtype == bool:
        return np.where(p, float(boost), 1.0)
    p = p.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(p) | (p < 0))
    if len(bad):
        raise ValueError(f"priority: {len(bad)} multipliers are negative or not finite, first at sample {bad[0]}")
    return p


def balanced_weights(hierarchy: Hierarchy, budget: float, priority=None, boost: float = 10.0,
                     max_repeat: float = 1.0) -> np.ndarray:
    """float64 (N,): each sample's expected draws in a balanced budget of `budget` draws.

    priority: None, a bool mask (N,) (True: multiplier `boost`) or multipliers (N,) >= 0.
    A sample is drawn at most max_repeat x its multiplier times; ValueError if the budget
    is more than that allows in total."""
    p = _priority(priority, hierarchy.num_points, boost)
    if not (budget > 0 and max_repeat > 0):
        raise ValueError(f"budget={budget}, max_repeat={max_repeat}: both must be > 0")
    cap_N = max_repeat * p
    if budget > cap_N.sum() * (1 + 1e-12):
        raise ValueError(f"budget={budget} draws exceeds what {hierarchy.num_points} samples allow at "
                         f"max_repeat={max_repeat} ({cap_N.sum():.6g}); raise max_repeat or lower the budget")
    leaf_cap = np.bincount(hierarchy.labels_N, weights=cap_N, minlength=hierarchy.num_clusters(1))
    leaf_share = _top_down(hierarchy, leaf_cap, budget, water_fill)
    ratio = np.divide(leaf_share, leaf_cap, out=np.zeros_like(leaf_share), where=leaf_cap > 0)
    return cap_N * ratio[hierarchy.labels_N]


def balanced_subset(hierarchy: Hierarchy, budget: int, strategy: str = "random", seed: int = 0) -> np.ndarray:
    """int64 sorted indices of `budget` distinct samples, split top-down by water-filling and
    picked within each leaf at random (seeded) or closest to the leaf's centroid first."""
    n = hierarchy.num_points
    if not 0 < budget <= n:
        raise ValueError(f"budget={budget}: a subset of 1..{n} samples")
    if strategy not in ("random", "closest"):
        raise ValueError(f"strategy={strategy!r} is not one of ['random', 'closest']")
    rng = np.random.default_rng(seed)
    labels = hierarchy.labels_N.astype(np.int64)
    sizes = np.bincount(labels, minlength=hierarchy.num_clusters(1))
    share = _top_down(hierarchy, sizes, int(budget), lambda c, b: water_fill_int(c, int(b), rng))
    within = rng.random(n) if strategy == "random" else hierarchy.dist_N
    order = np.lexsort((np.arange(n), within, labels))  # by leaf, then the strategy's preference
    sorted_labels = labels[order]
    rank = np.arange(n) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    picked = np.sort(order[rank < share[sorted_labels]])
    assert len(picked) == budget, (len(picked), budget)
    return picked


def cluster_draws(hierarchy: Hierarchy, level: int, weights_N) -> np.ndarray:
    """float64 (K_level,): the weights summed per cluster of `level` (expected draws per cluster)."""
    return np.bincount(hierarchy.labels(level), weights=np.asarray(weights_N, np.float64),
                       minlength=hierarchy.num_clusters(level))


# ---- rare entities -------------------------------------------------------------------------------

def match_entities(captions: Sequence[str], entities: Sequence[str]) -> dict[str, np.ndarray]:
    """{entity: bool (N,)}: captions that name the entity (case-insensitive, whole words:
    "ant" matches "an ant on a leaf", not "giant")."""
    out = {}
    lowered = [str(c).casefold() for c in captions]
    for entity in entities:
        words = str(entity).casefold().split()
        if not words:
            raise ValueError(f"entity {entity!r} is empty")
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)")
        out[entity] = np.array([bool(pattern.search(c)) for c in lowered], dtype=bool)
    return out


def entity_priority(captions: Sequence[str], entities: Sequence[str], boost: float = 10.0) -> np.ndarray:
    """float64 (N,) multipliers: `boost` for captions naming any of `entities`, else 1."""
    if boost < 0:
        raise ValueError(f"boost={boost}: a multiplier >= 0")
    hit = np.zeros(len(captions), dtype=bool)
    for mask in match_entities(captions, entities).values():
        hit |= mask
    return np.where(hit, float(boost), 1.0)


# ---- the gap report ------------------------------------------------------------------------------

def gap_report(labels, weights=None, target: Mapping | None = None, names: Mapping | None = None,
               min_ratio: float = 0.5) -> list[dict]:
    """Groups whose share of the (weighted) samples falls short of a target share.

    labels: (N,) a group per sample (cluster ids, concept names), or {name: bool (N,)} for
    concepts that may overlap (match_entities). weights: (N,) counts per sample (None: 1
    each, the data as it is; balanced_weights: the plan). target: None for uniform over
    the groups, or {group: share}: only those groups are reported, one absent from the
    data with count 0. Rows, fewest-represented first: group, name, count, share, target,
    ratio (share / target) and under (ratio < min_ratio)."""
    if isinstance(labels, Mapping):
        masks = {g: np.asarray(m, dtype=bool) for g, m in labels.items()}
        n = len(next(iter(masks.values()))) if masks else 0
        if any(m.shape != (n,) for m in masks.values()):
            raise ValueError("gap_report: the concept masks have different lengths")
    else:
        labels = np.asarray(labels)
        n = len(labels)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"gap_report: {w.shape} weights for {n} samples")
    total = float(w.sum())
    if isinstance(labels, Mapping):
        counts = {g: float(w[m].sum()) for g, m in masks.items()}
    else:
        groups, inverse = np.unique(labels, return_inverse=True)
        sums = np.bincount(inverse.reshape(-1), weights=w, minlength=len(groups))
        counts = {g.item() if hasattr(g, "item") else g: float(s) for g, s in zip(groups, sums)}
    if target is None:
        target = {g: 1.0 / len(counts) for g in counts} if counts else {}
    rows = []
    for g, t in target.items():
        if not t > 0:
            raise ValueError(f"gap_report: target share {t!r} of group {g!r} must be > 0")
        c = counts.get(g, 0.0)
        share = c / total if total > 0 else 0.0
        rows.append({"group": g, "name": str(names[g]) if names and g in names else "", "count": c, "share": share,
                     "target": float(t), "ratio": share / t, "under": share / t < min_ratio})
    rows.sort(key=lambda r: (r["ratio"], str(r["group"])))
    return rows


def format_gap_report(rows: list[dict], limit: int | None = None) -> str:
    """The rows as a fixed-width table, the under-represented marked."""
    shown = rows if limit is None else rows[:limit]
    lines = [f"{'group':>10} {'name':<24} {'count':>12} {'share':>8} {'target':>8} {'ratio':>7}"]
    for r in shown:
        lines.append(f"{str(r['group']):>10} {r['name'][:24]:<24} {r['count']:>12.1f} {r['share']:>8.2%} "
                     f"{r['target']:>8.2%} {r['ratio']:>7.2f}{'  UNDER' if r['under'] else ''}")
    under = sum(r["under"] for r in rows)
    lines.append(f"{under} of {len(rows)} groups under-represented")
    return "\n".join(lines)
