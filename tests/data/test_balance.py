"""Balanced sampling: water-filling on hand-computed examples, a much flatter histogram than
uniform on clusters of sizes 10000/1000/100/10, priority raising rare samples' draws, the
gap report naming the planted under-represented group."""

import numpy as np
import pytest

from data.balance import (balanced_subset, balanced_weights, cluster_draws, entity_priority, format_gap_report,
                          gap_report, match_entities, water_fill, water_fill_int)
from data.clusters import Hierarchy, HierarchyConfig, build_hierarchy

# Leaves (level 1) of sizes 1, 2, 9, 4, 4; level 2: A1 = {L0, L1}, A2 = {L2}, B1 = {L3, L4};
# level 3: A = {A1, A2}, B = {B1}.
LEAF_SIZES = [1, 2, 9, 4, 4]
LEVEL2 = [0, 0, 1, 2, 2]
LEVEL3 = [0, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def small() -> Hierarchy:
    leaf = np.repeat(np.arange(5), LEAF_SIZES)
    x = np.random.default_rng(0).standard_normal((len(leaf), 4)).astype(np.float32)
    return Hierarchy.from_labels(x, [leaf, np.array(LEVEL2)[leaf], np.array(LEVEL3)[leaf]])


def test_water_fill_pinned():
    np.testing.assert_allclose(water_fill([1, 2, 10], 9), [1, 2, 6])
    np.testing.assert_allclose(water_fill([5, 5, 5], 6), [2, 2, 2])
    np.testing.assert_allclose(water_fill([3, 0, 8, 1], 7), [3, 0, 3, 1])
    np.testing.assert_allclose(water_fill([1, 2], 10), [1, 2])  # more budget than room: all of it
    got = water_fill_int([1, 5, 10], 10, np.random.default_rng(0))
    assert got[0] == 1 and sorted(got[1:].tolist()) == [4, 5]  # level 4.5: one of the two gets the 5th


def test_weights_split_top_down_by_hand(small):
    """Budget 14. Top: A (12 samples) and B (8) get 7 each. A's 7: A1 (3) is smaller than its
    3.5, takes 3, A2 gets 4. B1 gets B's 7. A1's 3: L0 1, L1 2. B1's 7: L3 and L4 3.5 each.
    Per sample: L0, L1 1 each; L2 4/9; L3, L4 3.5/4 (uniform would be 14/20 = 0.7 each)."""
    w = balanced_weights(small, 14)
    expected = np.repeat([1.0, 1.0, 4 / 9, 0.875, 0.875], LEAF_SIZES)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    np.testing.assert_allclose(cluster_draws(small, 2, w), [3, 4, 7])
    np.testing.assert_allclose(cluster_draws(small, 3, w), [7, 7])
    with pytest.raises(ValueError, match="budget=21 draws exceeds"):
        balanced_weights(small, 21)
    np.testing.assert_allclose(balanced_weights(small, 40, max_repeat=2), 2.0)  # all of every sample


def test_subset_split_by_hand(small):
    leaf = small.labels(1)
    for strategy in ("random", "closest"):
        idx = balanced_subset(small, 14, strategy=strategy, seed=3)
        assert len(np.unique(idx)) == 14
        counts = np.bincount(leaf[idx], minlength=5)
        assert counts[:3].tolist() == [1, 2, 4] and sorted(counts[3:].tolist()) == [3, 4], counts
    closest = balanced_subset(small, 14, strategy="closest")
    in_l2 = np.flatnonzero(leaf == 2)
    nearest4 = in_l2[np.argsort(small.dist_N[in_l2], kind="stable")[:4]]
    assert set(closest[leaf[closest] == 2].tolist()) == set(nearest4.tolist())


def test_priority_raises_rare_draws_by_hand(small):
    """One sample of L2 boosted x10: L2's capacity becomes 18, A2 still gets 4 (A1's 3 is
    capped), and L2's 4 are split 10 : 1 : ... : 1, so the rare sample expects 40/18 draws
    instead of 4/9 and its 8 leaf-mates 4/18 each; every other sample is unchanged."""
    rare = np.zeros(20, bool)
    rare[3] = True  # the first sample of L2 (L0 and L1 hold samples 0..2)
    plain = balanced_weights(small, 14)
    boosted = balanced_weights(small, 14, priority=rare, boost=10)
    assert boosted[3] == pytest.approx(40 / 18) and plain[3] == pytest.approx(4 / 9)
    np.testing.assert_allclose(boosted[4:12], 4 / 18)
    np.testing.assert_allclose(np.delete(boosted, range(3, 12)), np.delete(plain, range(3, 12)))
    assert boosted.sum() == pytest.approx(14)


@pytest.fixture(scope="module")
def unequal():
    """Four concepts of 10000, 1000, 100 and 10 points, clustered for real (4 levels)."""
    rng = np.random.default_rng(0)
    sizes = [10000, 1000, 100, 10]
    concept = np.repeat(np.arange(4), sizes)
    x = (4 * rng.standard_normal((4, 16))[concept] + rng.standard_normal((len(concept), 16))).astype(np.float32)
    h = build_hierarchy(x, HierarchyConfig(clusters=[64, 16, 8, 4], seed=0))
    return h, concept


def test_balanced_is_much_flatter_than_uniform(unequal):
    h, concept = unequal
    top = h.labels(4)
    table = np.zeros((4, 4), int)
    np.add.at(table, (top, concept), 1)
    assert (table.max(1) == table.sum(1)).all() and (table > 0).sum() == 4, f"top level vs concepts:\n{table}"

    draws = 4000
    rng = np.random.default_rng(1)
    w = balanced_weights(h, draws, max_repeat=50)
    balanced = np.bincount(concept[rng.choice(len(concept), draws, p=w / w.sum())], minlength=4)
    uniform = np.bincount(concept[rng.choice(len(concept), draws)], minlength=4)
    ratio_b = balanced.max() / max(balanced.min(), 1)
    ratio_u = uniform.max() / max(uniform.min(), 1)
    report = f"draws per concept: balanced {balanced.tolist()} (max/min {ratio_b:.1f}), " \
             f"uniform {uniform.tolist()} (max/min {ratio_u:.1f})"
    # expected: the 10-point concept is capped at 10 x 50 = 500 draws, the others split the rest
    np.testing.assert_allclose(np.bincount(concept, weights=w), [3500 / 3] * 3 + [500], rtol=1e-9, err_msg=report)
    assert ratio_b < 3 and ratio_u > 100, report


def test_entities_and_priority():
    captions = ["An Okapi in the rain", "a giant ant", "okapis grazing", "two cats", "the okapi  calf"]
    masks = match_entities(captions, ["okapi", "ant", "okapi calf"])
    assert masks["okapi"].tolist() == [True, False, False, False, True]  # whole words, any case
    assert masks["ant"].tolist() == [False, True, False, False, False]  # not "giant"
    assert masks["okapi calf"].tolist() == [False, False, False, False, True]
    np.testing.assert_array_equal(entity_priority(captions, ["okapi", "cats"], boost=5), [5, 1, 1, 5, 5])


def test_gap_report_names_the_underrepresented():
    labels = np.repeat([0, 1, 2, 3], [300, 300, 300, 20])
    rows = gap_report(labels, names={3: "okapi"})
    under = [r for r in rows if r["under"]]
    assert [r["group"] for r in under] == [3] and rows[0]["name"] == "okapi"
    assert under[0]["count"] == 20 and under[0]["share"] == pytest.approx(20 / 920)
    assert under[0]["ratio"] == pytest.approx(20 / 920 / 0.25)
    table = format_gap_report(rows)
    assert "okapi" in table.splitlines()[1] and "UNDER" in table.splitlines()[1]
    assert table.splitlines()[-1] == "1 of 4 groups under-represented"

    # the balanced plan closes the gap: every group gets the same share
    h = Hierarchy.from_labels(np.zeros((920, 2), np.float32), [labels])
    assert not any(r["under"] for r in gap_report(labels, balanced_weights(h, 80)))

    # target shares per named concept, concepts from captions (may overlap); one absent
    captions = ["okapi"] * 3 + ["cat"] * 60 + ["cat and dog"] * 37
    concepts = match_entities(captions, ["okapi", "cat", "dog"])
    rows = gap_report(concepts, target={"okapi": 0.1, "cat": 0.5, "dog": 0.2, "axolotl": 0.05})
    assert [r["group"] for r in rows if r["under"]] == ["axolotl", "okapi"]
    assert rows[0]["count"] == 0 and rows[1]["ratio"] == pytest.approx(0.3)
