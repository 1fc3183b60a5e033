"""Hierarchical k-means recovers planted concepts at two scales, every level is a nearest-centroid
assignment nested in the one above, resampling moves centroids off a dense core, empty clusters
are removed and reported, and the saved folder round-trips or is refused by name."""

import io
import json
import os

import numpy as np
import pytest

from data.clusters import Hierarchy, HierarchyConfig, build_hierarchy, cluster_level

SUPER, FINE, PER, DIM = 8, 5, 100, 32
LEVELS = [40, 20, 16, 8]


@pytest.fixture(scope="module")
def planted():
    """8 super-concepts (centres ~40 apart), 5 fine concepts in each (~8 apart), 100 points
    per fine concept (spread 0.3 per dimension): labels at two scales."""
    rng = np.random.default_rng(0)
    sup = rng.standard_normal((SUPER, DIM)) * 5
    fine = (sup[:, None, :] + rng.standard_normal((SUPER, FINE, DIM))).reshape(-1, DIM)
    fine_label = np.repeat(np.arange(SUPER * FINE), PER)
    x = (fine[fine_label] + 0.3 * rng.standard_normal((len(fine_label), DIM))).astype(np.float32)
    return x, fine_label, fine_label // FINE


@pytest.fixture(scope="module")
def hierarchy(planted):
    x = planted[0]
    return build_hierarchy(x, HierarchyConfig(clusters=LEVELS, seed=0), keys=[f"k{i:05d}" for i in range(len(x))])


def _purity(found, truth) -> tuple[float, float]:
    """(purity, inverse purity): the share of points in their cluster's majority concept, and in
    their concept's majority cluster. Both are 1 only for the planted partition itself."""
    table = np.zeros((found.max() + 1, truth.max() + 1))
    np.add.at(table, (found, truth), 1)
    return table.max(1).sum() / len(found), table.max(0).sum() / len(found)


def test_recovers_planted_concepts(planted, hierarchy):
    _, fine, sup = planted
    assert hierarchy.num_levels == 4
    assert [hierarchy.num_clusters(lv) for lv in range(1, 5)] == LEVELS
    p1 = _purity(hierarchy.labels(1), fine)
    p4 = _purity(hierarchy.labels(4), sup)
    assert min(p1) >= 0.95, f"level 1 vs the 40 fine concepts: purity, inverse purity {p1}"
    assert p4 == (1.0, 1.0), f"level 4 vs the 8 super-concepts: purity, inverse purity {p4}"


def test_levels_are_nested_nearest_centroid_assignments(planted, hierarchy):
    x = planted[0].astype(np.float64)
    c1 = hierarchy.centroids[0].astype(np.float64)
    d2 = ((x[:, None, :] - c1[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(hierarchy.labels(1), d2.argmin(1))
    np.testing.assert_allclose(hierarchy.dist_N, d2.min(1), rtol=1e-4, atol=1e-3)
    for lv in range(1, 4):
        lower, upper = (hierarchy.centroids[i].astype(np.float64) for i in (lv - 1, lv))
        nearest = ((lower[:, None, :] - upper[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(hierarchy.cluster_parents(lv), nearest)
        # a point's cluster at level lv + 1 is the parent of its cluster at level lv
        np.testing.assert_array_equal(hierarchy.labels(lv + 1), hierarchy.cluster_parents(lv)[hierarchy.labels(lv)])
        assert hierarchy.sizes(lv + 1).sum() == len(x) and (hierarchy.sizes(lv + 1) > 0).all()


def test_deterministic_for_a_seed(planted, hierarchy):
    again = build_hierarchy(planted[0], HierarchyConfig(clusters=LEVELS, seed=0))
    for a, b in zip(hierarchy.centroids, again.centroids):
        np.testing.assert_array_equal(a, b)
    for lv in range(1, 5):
        np.testing.assert_array_equal(hierarchy.labels(lv), again.labels(lv))


def test_resampling_moves_centroids_off_a_dense_core():
    """90% of 20000 points in a disc of radius ~1, 10% spread over a 20 x 20 square: plain
    k-means spends 11-13 of 50 centroids on the core, five resampling steps 3-4 (the core
    is ~2% of the support)."""
    rng = np.random.default_rng(0)
    core = 0.5 * rng.standard_normal((18000, 2))
    tail = rng.uniform(-10, 10, (2000, 2))
    x = np.concatenate([core, tail]).astype(np.float32)
    in_core = []
    for steps in (0, 5):
        centroids, _, _, report = cluster_level(x, 50, 20, steps, None, 0, 1 << 30)
        assert report["resample_steps"] == steps and report["resample_size"] == (200 if steps else None)
        in_core.append(int((np.linalg.norm(centroids, axis=1) < 1.5).sum()))
    assert in_core[0] >= 10 and in_core[1] <= 6, f"centroids in the core without / with resampling: {in_core}"


def test_empty_clusters_are_removed_and_reported():
    """Three distinct points, 100 copies each, asked for 5 clusters: two stay empty."""
    rng = np.random.default_rng(1)
    x = np.repeat(10 * rng.standard_normal((3, 8)), 100, axis=0).astype(np.float32)
    h = build_hierarchy(x, HierarchyConfig(clusters=[5, 2, 2, 1], seed=0))
    assert h.num_clusters(1) == 3 and h.meta["levels"][0]["empty_removed"] == 2
    assert h.meta["levels"][0]["requested"] == 5
    assert sorted(h.sizes(1).tolist()) == [100, 100, 100]
    assert _purity(h.labels(1), np.repeat(np.arange(3), 100)) == (1.0, 1.0)
    assert "2 empty removed" in h.summary()
    with pytest.raises(ValueError, match="4 clusters asked of 3 points"):
        build_hierarchy(x, HierarchyConfig(clusters=[5, 4, 2, 1], seed=0))


def test_save_load_round_trip(planted, hierarchy, tmp_path):
    folder = hierarchy.save(tmp_path / "h")
    assert sorted(os.listdir(folder)) == ["hierarchy.json", "hierarchy.npz"]
    back = Hierarchy.load(folder, dim=DIM)
    for a, b in zip(hierarchy.centroids + hierarchy.parents, back.centroids + back.parents):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.labels_N, hierarchy.labels_N)
    np.testing.assert_array_equal(back.dist_N, hierarchy.dist_N)
    assert back.keys.tolist() == hierarchy.keys.tolist() and back.meta == hierarchy.meta
    np.testing.assert_array_equal(back.assign(planted[0]),
                                  np.stack([hierarchy.labels(lv) for lv in range(1, 5)], axis=1))


def test_bad_files_are_named(planted, hierarchy, tmp_path):
    folder = hierarchy.save(tmp_path / "h")
    npz, js = folder / "hierarchy.npz", folder / "hierarchy.json"
    with pytest.raises(ValueError, match=f"{npz}: centroids are 32 wide, the embeddings 768"):
        Hierarchy.load(folder, dim=768)
    with pytest.raises(ValueError, match="embeddings are 16 wide"):
        hierarchy.assign(np.zeros((3, 16), np.float32))

    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{npz}: unreadable"):
        Hierarchy.load(folder)
    arrays = dict(np.load(io.BytesIO(good)))
    arrays["parents_2"] = arrays["parents_2"] + 100  # points at level-3 clusters that do not exist
    np.savez(npz, **arrays)
    with pytest.raises(ValueError, match=f"{npz}: parents_2 has values outside 0..15"):
        Hierarchy.load(folder)
    del arrays["centroids_4"]
    np.savez(npz, **arrays)
    with pytest.raises(ValueError, match=r"arrays \['centroids_4'\] missing"):
        Hierarchy.load(folder)

    js.write_text("{not json")
    with pytest.raises(ValueError, match=f"{js}: not readable JSON"):
        Hierarchy.load(folder)
    js.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=f"{js}: not a k2train-hierarchy/1 header"):
        Hierarchy.load(folder)
    os.remove(js)
    with pytest.raises(ValueError, match=f"{js}: missing"):
        Hierarchy.load(folder)


def test_bad_inputs():
    with pytest.raises(ValueError, match="1 rows are not finite, first row 2"):
        build_hierarchy(np.array([[0, 1], [1, 0], [np.nan, 0]], np.float32), HierarchyConfig(clusters=[1]))
    with pytest.raises(ValueError, match="resample_steps=\\[0\\] has 1 entries for 2 levels"):
        build_hierarchy(np.eye(4, dtype=np.float32), HierarchyConfig(clusters=[2, 1], resample_steps=[0]))
