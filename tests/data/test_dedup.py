"""Dedup removes exactly the planted copies (exact and near), keeps the smallest key of each
group whatever the input order, chains near copies into one group, and hashes decoded pixels."""

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from data.dedup import (deduplicate, exact_duplicates, file_hash, image_hash, near_duplicates, pixel_hash,
                        similar_pairs)

N, D, THRESHOLD = 2000, 64, 0.95


@pytest.fixture(scope="module")
def planted():
    """2000 random directions (in 64-d two of them have |cosine| < 0.7), plus planted copies:
    20 exact (same hash and embedding) and 30 near (embedding + noise of norm ~0.03 x its own,
    cosine > 0.999, another hash). Half the copies get a key that sorts before the original's,
    so the kept one is not simply the first written."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((N, D)).astype(np.float32)
    keys = [f"img/{i:05d}" for i in range(N)]
    hashes = [f"sha-{i}" for i in range(N)]
    copies_emb, copy_keys, copy_hashes, original = [], [], [], {}
    for c in range(50):
        src = int(rng.integers(N))
        while src in original.values():
            src = int(rng.integers(N))
        key = f"img/{src:05d}-copy" if c % 2 else f"aaa/{c:03d}"  # "aaa/..." sorts before "img/..."
        exact = c < 20
        noise = 0 if exact else 0.03 * np.linalg.norm(emb[src]) / np.sqrt(D) * rng.standard_normal(D)
        copies_emb.append(emb[src] + noise)
        copy_keys.append(key)
        copy_hashes.append(hashes[src] if exact else f"sha-copy-{c}")
        original[key] = src
    emb = np.concatenate([emb, np.array(copies_emb, np.float32)])
    return keys + copy_keys, hashes + copy_hashes, emb, original


def _expected(keys, original):
    """Per planted group, (kept key, dropped key): the smaller key of original and copy."""
    out = []
    for copy, src in original.items():
        pair = sorted([keys[src], copy])
        out.append((pair[0], pair[1]))
    return out


def test_removes_exactly_the_planted_copies(planted):
    keys, hashes, emb, original = planted
    result = deduplicate(keys, hashes, emb, THRESHOLD)
    expected = _expected(keys, original)
    dropped = {k for k, kept in zip(keys, result.kept) if not kept}
    assert dropped == {d for _, d in expected}, (sorted(dropped - {d for _, d in expected}),
                                                 sorted({d for _, d in expected} - dropped))
    at = {k: i for i, k in enumerate(keys)}
    for keep, drop in expected:
        i = at[drop]
        assert result.representative[i] == keep and result.representative[at[keep]] == keep
        assert result.group[i] == result.group[at[keep]]
        exact = hashes[at[keep]] == hashes[i]
        assert result.stage[i] == ("exact" if exact else "near")
        assert result.similarity[i] > 0.999
    assert len(np.unique(result.group)) == len(keys) - 50  # every other input is its own group
    records = {r["key"]: r for r in result.records()}
    exact_drop = next(d for k, d in expected if hashes[at[k]] == hashes[at[d]])
    near_drop = next(d for k, d in expected if hashes[at[k]] != hashes[at[d]])
    assert records[exact_drop]["reason"].startswith("exact duplicate of ") and records[exact_drop]["score"] == 1.0
    assert records[near_drop]["reason"].startswith(f"near duplicate of {records[near_drop]['representative']}")
    assert records[keys[0]]["kept"] and records[keys[0]]["stage"] is None


def test_choice_does_not_depend_on_input_order(planted):
    keys, hashes, emb, _ = planted
    base = deduplicate(keys, hashes, emb, THRESHOLD)
    perm = np.random.default_rng(1).permutation(len(keys))
    shuffled = deduplicate([keys[i] for i in perm], [hashes[i] for i in perm], emb[perm], THRESHOLD)
    assert dict(zip(keys, base.representative)) == dict(zip([keys[i] for i in perm], shuffled.representative))
    assert dict(zip(keys, base.group.tolist())) == dict(zip([keys[i] for i in perm], shuffled.group.tolist()))


def test_ivf_index_finds_the_same_groups(planted):
    keys, _, emb, original = planted
    flat = near_duplicates(keys, emb, THRESHOLD, index="flat")
    ivf = near_duplicates(keys, emb, THRESHOLD, index="ivf", nlist=16, nprobe=4)
    assert {k for k, kept in zip(keys, flat.kept) if not kept} == {d for _, d in _expected(keys, original)}
    np.testing.assert_array_equal(ivf.kept, flat.kept)
    assert ivf.representative == flat.representative


def test_near_copies_chain_into_one_group():
    """a~b and b~c above the threshold, a and c below it (cosines 0.966, 0.966, 0.866 for
    0.94): one group, the smallest key kept, c's reason names the chain."""
    rng = np.random.default_rng(2)
    others = rng.standard_normal((50, 16)).astype(np.float32)
    angles = np.radians([0.0, 15.0, 30.0])
    chain = np.zeros((3, 16), np.float32)
    chain[:, 0], chain[:, 1] = np.cos(angles), np.sin(angles)
    keys = ["c", "a", "b"] + [f"z{i}" for i in range(50)]  # "a" is chain[1], the middle one
    result = near_duplicates(keys, np.concatenate([chain, others]), threshold=0.94)
    assert result.kept.tolist()[:3] == [False, True, False] and result.kept[3:].all()
    assert result.representative[:3] == ["a", "a", "a"]
    np.testing.assert_allclose(result.similarity[:3], np.cos(np.radians([15, 0, 15])), atol=1e-5)
    chain_far = near_duplicates(["a", "b", "c"] + keys[3:], np.concatenate([chain, others]), threshold=0.94)
    assert chain_far.representative[:3] == ["a", "a", "a"]
    np.testing.assert_allclose(chain_far.similarity[2], np.cos(np.radians(30)), atol=1e-5)
    assert "through a chain" in chain_far.reason(2) and "0.8660" in chain_far.reason(2)


def test_exact_groups_without_embeddings():
    result = exact_duplicates(["k3", "k1", "k2", "k0"], ["x", "y", "x", "x"])
    assert result.kept.tolist() == [False, True, False, True]
    assert result.representative == ["k0", "k1", "k0", "k0"]
    assert result.group.tolist() == [0, 1, 0, 0]  # groups in the order of their kept key


def test_image_hash_is_of_pixels_not_bytes(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(pixels).save(a, compress_level=1)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "same picture, other file")
    Image.fromarray(pixels).save(b, compress_level=9, pnginfo=info)
    assert file_hash(str(a)) != file_hash(str(b))
    assert image_hash(str(a)) == image_hash(str(b)) == pixel_hash(pixels)
    assert pixel_hash(pixels.reshape(32, 24, 3)) != pixel_hash(pixels)  # same bytes, other shape
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_hash(changed) != pixel_hash(pixels)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        image_hash(str(tmp_path / "bad.png"))


def test_bad_inputs_are_named():
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="'k1' occurs more than once"):
        near_duplicates(["k1", "k2", "k1"], emb)
    with pytest.raises(ValueError, match="'k2'"):
        near_duplicates(["k1", "k2", "k3"], np.array([[1, 0], [0, 0], [0, 1]], np.float32))
    with pytest.raises(ValueError, match=r"\(3, D\)"):
        near_duplicates(["k1", "k2", "k3"], emb[:2])


def test_ivf_join_is_exact_when_every_list_is_probed():
    """nprobe = nlist compares every pair, as flat search does; fewer probes find a subset.
    Threshold 0.5 on clustered points: thousands of pairs, many across lists."""
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((10, 32))
    x = (centres[rng.integers(10, size=1500)] + 0.7 * rng.standard_normal((1500, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fi, fj, fs = similar_pairs(x, 0.5, index="flat")
    ii, ij, isim = similar_pairs(x, 0.5, index="ivf", nlist=8, nprobe=8)
    assert len(fi) > 5000
    flat = dict(zip(zip(fi.tolist(), fj.tolist()), fs.tolist()))
    ivf = dict(zip(zip(ii.tolist(), ij.tolist()), isim.tolist()))
    assert ivf.keys() == flat.keys() and (ii < ij).all()
    np.testing.assert_allclose([ivf[k] for k in flat], list(flat.values()), atol=1e-5)
    some = set(zip(*[a.tolist() for a in similar_pairs(x, 0.5, index="ivf", nlist=8, nprobe=2)[:2]]))
    assert some < flat.keys() and len(some) > 0.5 * len(flat)
