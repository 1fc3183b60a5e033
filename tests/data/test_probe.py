"""The synthetic-image probe on planted data: Gaussian classes whose best achievable
false-positive rate is known in closed form, a fingerprint only an MLP can read, and shapes
images with a generator-like fingerprint through the tiny tower; its threshold against a
brute-force search; its file and what it refuses."""

import math
import re

import numpy as np
import pytest
import torch

from data.embeddings import build_embedder
from data.probe import ProbeConfig, SyntheticImageProbe, choose_threshold, detection_rates, train_probe

META = {"model": "test/planted", "version": "v1", "dim": 32}
SHIFT = 4.0  # |mean(generated) - mean(real)| in units of the classes' common std


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _z(p: float) -> float:
    """The standard normal quantile, by bisection on _phi."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _phi(mid) < p else (lo, mid)
    return lo


def planted(n_per_class: int, seed: int, two_sided: bool = False, dim: int = 32):
    """Real: N(0, I). Generated: N(mu, I), mu = SHIFT spread over 4 of the dims (or, two-sided,
    +mu or -mu with equal odds: no linear read-out separates those)."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(dim)
    mu[[3, 7, 11, 19]] = SHIFT / 2
    real = rng.standard_normal((n_per_class, dim))
    sign = rng.choice([-1.0, 1.0], size=(n_per_class, 1)) if two_sided else 1.0
    generated = rng.standard_normal((n_per_class, dim)) + sign * mu
    x = np.concatenate([real, generated]).astype(np.float32)
    return x, np.repeat([0, 1], n_per_class)


# The best any filter can do at recall r: project on mu, threshold at SHIFT - z_r.
def best_fpr(recall: float, two_sided: bool = False) -> float:
    t = SHIFT - _z(recall)
    return (2 if two_sided else 1) * (1 - _phi(t))


def test_choose_threshold_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = np.round(rng.random(n), 1)  # many ties
        target = float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0]))
        t = choose_threshold(scores, labels, target)
        rates = detection_rates(scores, labels, t)
        assert rates["recall"] >= target - 1e-12, (trial, t, rates)
        # of the candidate thresholds that keep the recall, the fewest real images dropped,
        # and at that count the most generated ones
        candidates = [c for c in np.unique(scores) if (scores[labels == 1] >= c).mean() >= target - 1e-12]
        counts = [(int(((scores >= c) & (labels == 0)).sum()), -int(((scores >= c) & (labels == 1)).sum()))
                  for c in candidates]
        got = (int(((scores >= t) & (labels == 0)).sum()), -int(((scores >= t) & (labels == 1)).sum()))
        assert got == min(counts), (trial, t, got, min(counts))
    # the midpoint between the last generated score kept and the next one below
    assert choose_threshold([0.9, 0.8, 0.2, 0.6, 0.1], [1, 1, 1, 0, 0], 2 / 3) == pytest.approx(0.7)
    # separable classes: the whole gap is free, so every generated image is caught
    assert choose_threshold([0.9, 0.7, 0.5, 0.3, 0.1], [1, 1, 1, 0, 0], 0.5) == pytest.approx(0.4)
    # no real image below the k-th generated score: all real ones go, and all generated with them
    assert choose_threshold([0.9, 0.2, 0.95, 0.92], [1, 1, 0, 0], 0.5) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="target_recall"):
        choose_threshold([0.5], [1], 0.0)
    with pytest.raises(ValueError, match="needs generated"):
        choose_threshold([0.5], [0], 0.9)


def test_linear_probe_reaches_target_recall_near_the_best_possible_false_positives():
    x, y = planted(1500, seed=0)
    probe = train_probe(x, y, META, ProbeConfig(target_recall=0.95))
    held = probe.report["heldout"]
    assert held["num_generated"] == 375 and held["num_real"] == 375
    assert held["recall"] >= 0.95 and held["false_positive_rate"] <= best_fpr(0.95) + 0.02, held
    # on data it never saw: the recall holds up to the held-out split's sampling error, and
    # the false-positive rate is near the closed-form best (0.93 % at recall 0.95; measured
    # with split seeds 0-2: recall 0.955-0.967, false positives 1.4-1.6 %)
    fresh_x, fresh_y = planted(5000, seed=1)
    drop, scores = probe.decide(fresh_x, META)
    assert drop.dtype == bool and scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    fresh = detection_rates(scores, fresh_y, probe.threshold)
    assert fresh["recall"] >= 0.93, fresh
    assert fresh["false_positive_rate"] <= best_fpr(0.95) + 0.015, (fresh, best_fpr(0.95))
    assert np.array_equal(drop, scores >= probe.threshold)


def test_mlp_reads_a_fingerprint_no_linear_probe_can():
    x, y = planted(1500, seed=0, two_sided=True)
    fresh_x, fresh_y = planted(3000, seed=1, two_sided=True)
    rates = {}
    # measured on fresh data, split seeds 0-2: MLP recall 0.95-0.96, false positives
    # 1.9-3.2 % (the best possible 1.85 %); the linear probe's 95-97 %
    for hidden in (0, 16):
        probe = train_probe(x, y, META, ProbeConfig(hidden=hidden, weight_decay=1e-2, target_recall=0.95))
        rates[hidden] = detection_rates(probe.scores(fresh_x), fresh_y, probe.threshold)
    assert rates[0]["false_positive_rate"] > 0.5, rates  # a linear read-out of +-mu is blind
    assert rates[16]["recall"] >= 0.93, rates
    assert rates[16]["false_positive_rate"] <= best_fpr(0.95, two_sided=True) + 0.03, rates


def _fingerprint(image_HWC: np.ndarray) -> np.ndarray:
    """A generator-like trace: a faint +-6 level checkerboard of 2 px cells, the footprint of
    transposed-convolution upsampling, invisible at a glance."""
    ys, xs = np.ogrid[:image_HWC.shape[0], :image_HWC.shape[1]]
    pattern = np.where((ys // 2 + xs // 2) % 2 == 0, 6.0, -6.0)[..., None]
    return np.clip(image_HWC.astype(np.float64) + pattern, 0, 255).astype(np.uint8)


def test_probe_finds_a_generator_fingerprint_in_shapes_images(world):
    embedder = build_embedder("open_clip", "k2-tiny-resnet", batch_size=128)
    images = np.stack([world.sample(i)[0] for i in range(300)])
    # even indices real, odd ones fingerprinted: the two classes share no image
    real, fake = images[0::2], np.stack([_fingerprint(i) for i in images[1::2]])
    emb = torch.cat([embedder(real), embedder(fake)])
    probe = train_probe(emb, np.repeat([0, 1], 150), embedder.meta(), ProbeConfig(target_recall=0.9))
    fresh = np.stack([world.sample(i)[0] for i in range(50_000, 50_100)])
    fresh_emb = torch.cat([embedder(fresh), embedder(np.stack([_fingerprint(i) for i in fresh]))])
    drop, scores = probe.decide(fresh_emb, embedder.meta())
    rates = detection_rates(scores, np.repeat([0, 1], 100), probe.threshold)
    # measured: held-out and fresh recall 0.92-0.97 with no real image dropped
    assert rates["recall"] >= 0.85 and rates["false_positive_rate"] <= 0.05, (probe.report, rates)


def test_saved_probe_loads_to_the_same_decisions_and_refuses_other_embeddings(tmp_path):
    x, y = planted(400, seed=0, two_sided=True)
    probe = train_probe(x, y, META, ProbeConfig(hidden=8, steps=100))
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = SyntheticImageProbe.load(path, expect=META)
    fresh, _ = planted(100, seed=3, two_sided=True)
    assert np.array_equal(loaded.decide(fresh)[1], probe.decide(fresh)[1])
    assert loaded.threshold == probe.threshold and loaded.report == probe.report
    assert loaded.config == probe.config and loaded.embedding == META
    named = re.escape(str(path))
    with pytest.raises(ValueError, match=f"{named} takes embeddings \\(N, 32\\), got shape \\(200, 16\\)"):
        loaded.decide(fresh[:, :16])
    with pytest.raises(ValueError, match=f"{named} expects embeddings of test/planted .* got model 'dinov3/x'"):
        loaded.decide(fresh, {**META, "model": "dinov3/x"})
    with pytest.raises(ValueError, match=f"{named} expects .* got version 'v2'"):
        SyntheticImageProbe.load(path, expect={**META, "version": "v2"})
    with pytest.raises(ValueError, match=f"{named} expects .* got dim 768"):
        loaded.check({**META, "dim": 768})


@pytest.mark.parametrize("how", ["missing", "truncated", "weights of another width"])
def test_damaged_probe_file_raises_naming_it(tmp_path, how):
    x, y = planted(200, seed=0)
    path = tmp_path / "probe.safetensors"
    probe = train_probe(x, y, META, ProbeConfig(steps=20))
    if how != "missing":
        probe.save(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    elif how == "weights of another width":
        SyntheticImageProbe({**probe.params, "w": torch.zeros(16)}, META, 0.5, probe.config).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SyntheticImageProbe.load(path)


def test_train_probe_rejects_bad_labels_and_widths():
    x, y = planted(50, seed=0)
    with pytest.raises(ValueError, match="labels must be 0"):
        train_probe(x, y + 1, META)
    with pytest.raises(ValueError, match="takes embeddings \\(N, 32\\)"):
        train_probe(x[:, :8], y, META)
    with pytest.raises(ValueError, match="class 1 has 1 examples"):
        train_probe(x[:51], y[:51], META)
