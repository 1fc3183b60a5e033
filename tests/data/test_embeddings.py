"""Image embedders (open_clip and DINOv3, tiny random towers) against their libraries' own
forward passes, and the per-chunk embedding store with every damage it must name."""

import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

from data.embeddings import (SUFFIX, TINY_DINOV3, build_embedder, chunk_path, read_chunk, read_embeddings,
                             save_tensors, write_embeddings)

# A ViT tower in open_clip's own config format (the SigLIP-2 and CLIP ViTs take this path).
TINY_VIT = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def images(world):
    return np.stack([world.sample(i)[0] for i in range(6)])


@pytest.fixture(scope="module")
def resnet():
    return build_embedder("open_clip", "k2-tiny-resnet", batch_size=4)


@pytest.fixture(scope="module")
def dino():
    return build_embedder("dinov3", "k2-tiny-dinov3", batch_size=4)


def _unit_rows(emb, dim):
    assert emb.dtype == torch.float32 and emb.shape == (6, dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6), rtol=0, atol=1e-5)


# ---- open_clip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model, config", [("k2-tiny-resnet", None), ("k2-test-vit", TINY_VIT)])
def test_open_clip_embedding_is_encode_image_of_the_same_tower(images, model, config):
    embedder = build_embedder("open_clip", model, init_seed=3, model_config=config, batch_size=4)
    emb = embedder(images)
    _unit_rows(emb, embedder.dim)
    assert embedder.name == f"open_clip/{model}" and embedder.meta()["dim"] == embedder.dim
    # open_clip's own path: the whole CLIP model from the same seed, its transform, encode_image
    torch.manual_seed(3)
    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
    clip.eval()  # the tower's BatchNorm on its running statistics
    with torch.no_grad():
        expected = clip.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]), normalize=True)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)


def test_open_clip_seed_and_checkpoint_decide_weights_and_version(images, resnet, tmp_path):
    again = build_embedder("open_clip", "k2-tiny-resnet", batch_size=64)
    assert again.version == resnet.version
    # another batch size: the same weights, so the same embeddings up to float32 rounding
    # (a CPU GEMM may block a batch of 6 differently from two batches of 4 and 2)
    torch.testing.assert_close(again(images), resnet(images), rtol=1e-5, atol=1e-6)
    other = build_embedder("open_clip", "k2-tiny-resnet", init_seed=1)
    assert other.version != resnet.version
    assert (other(images) - resnet(images)).abs().max() > 1e-2
    # the real loading path, a checkpoint file: seed 1's weights give seed 1's version
    torch.manual_seed(1)
    clip, _, _ = open_clip.create_model_and_transforms("k2-tiny-resnet", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    loaded = build_embedder("open_clip", "k2-tiny-resnet", pretrained=str(tmp_path / "clip.pt"))
    assert loaded.version == other.version and loaded.meta()["pretrained"] == str(tmp_path / "clip.pt")
    torch.testing.assert_close(loaded(images), other(images), rtol=0, atol=1e-6)


# ---- DINOv3 -------------------------------------------------------------------------------------
def test_dinov3_embedding_is_the_normalised_pooler_output(images, dino):
    emb = dino(images)
    _unit_rows(emb, TINY_DINOV3["k2-tiny-dinov3"]["hidden_size"])
    assert dino.name == "dinov3/k2-tiny-dinov3"
    # transformers' own model from the same seed, its processor, its CLS output
    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3["k2-tiny-dinov3"])).eval()
    pixels = DINOv3ViTImageProcessor(size={"height": 32, "width": 32})(images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model(**pixels)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])  # the CLS token, before the registers
    torch.testing.assert_close(emb, F.normalize(out.pooler_output, dim=-1), rtol=1e-5, atol=1e-6)


def test_dinov3_seed_and_from_pretrained(images, dino, tmp_path):
    again = build_embedder("dinov3", "k2-tiny-dinov3", batch_size=64)
    assert again.version == dino.version and torch.equal(again(images), dino(images))
    other = build_embedder("dinov3", "k2-tiny-dinov3", init_seed=2)
    assert other.version != dino.version and (other(images) - dino(images)).abs().max() > 1e-2
    # a checkpoint folder as save_pretrained writes it, read back with from_pretrained
    other.tower.save_pretrained(tmp_path / "ckpt")
    other.processor.save_pretrained(tmp_path / "ckpt")
    loaded = build_embedder("dinov3", "tiny-ckpt", pretrained=str(tmp_path / "ckpt"))
    torch.testing.assert_close(loaded(images), other(images), rtol=0, atol=1e-6)
    assert loaded.name == "dinov3/tiny-ckpt" and loaded.version != dino.version
    # a folder with only a config.json: random weights for that architecture
    assert build_embedder("dinov3", str(tmp_path / "ckpt"), init_seed=2).version == other.version


def test_embedders_reject_bad_requests(images, resnet):
    with pytest.raises(ValueError, match="unknown embedder family 'siglip'"):
        build_embedder("siglip", "x")
    with pytest.raises(ValueError, match="open_clip has no model 'no-such-tower'"):
        build_embedder("open_clip", "no-such-tower")
    with pytest.raises(ValueError, match="no DINOv3 architecture 'no-such-dino'"):
        build_embedder("dinov3", "no-such-dino")
    with pytest.raises(ValueError, match="RGB uint8"):
        resnet(images.astype(np.float32))
    with pytest.raises(ValueError, match="no images"):
        resnet(images[:0])


# ---- the store ----------------------------------------------------------------------------------
META = {"model": "open_clip/k2-tiny-resnet", "version": "sha256:0123456789abcdef", "dim": 8, "pretrained": None}


def _rows(n, seed, dim=8):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_store_round_trip_in_chunk_order(tmp_path):
    b, a = _rows(3, 1), _rows(5, 2)
    write_embeddings(tmp_path, "chunk-b", ["b0", "b1", "b2"], b, META)
    write_embeddings(tmp_path, "chunk-a", [f"a{i}" for i in range(5)], torch.from_numpy(a), META)
    (tmp_path / f".chunk-c{SUFFIX}.1234.tmp").write_bytes(b"a crashed writer's leftover")
    keys, emb, meta = read_embeddings(tmp_path, expect_dim=8, model=META["model"], version=META["version"])
    assert keys == [f"a{i}" for i in range(5)] + ["b0", "b1", "b2"]
    assert emb.dtype == np.float32 and np.array_equal(emb, np.concatenate([a, b]))
    assert meta["chunks"] == ["chunk-a", "chunk-b"] and meta["count"] == 8 and meta["dim"] == 8
    assert meta["model"] == META["model"] and meta["version"] == META["version"]
    # one chunk; a retried job replaces its chunk
    keys, emb, _ = read_chunk(chunk_path(tmp_path, "chunk-b"))
    assert keys == ["b0", "b1", "b2"] and np.array_equal(emb, b)
    write_embeddings(tmp_path, "chunk-b", ["b9"], _rows(1, 3), META)
    keys, emb, _ = read_embeddings(tmp_path, chunks=["chunk-b"])
    assert keys == ["b9"] and np.array_equal(emb, _rows(1, 3))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        [f"chunk-a{SUFFIX}", f"chunk-b{SUFFIX}"]


def test_store_keeps_an_embedders_output(tmp_path, images, resnet):
    emb = resnet(images)
    write_embeddings(tmp_path, "c0", [f"img{i}" for i in range(6)], emb, resnet.meta())
    keys, back, meta = read_embeddings(tmp_path, expect_dim=512, model=resnet.name, version=resnet.version)
    assert np.array_equal(back, emb.numpy()) and meta["pretrained"] is None


def _forge(path, emb, **meta):
    """A chunk file with the given header fields, as a damaged or foreign writer might leave."""
    record = {**META, "format": "k2-embeddings-1", "chunk": "c1", "count": len(emb),
              "keys": [f"k{i}" for i in range(len(emb))], **meta}
    save_tensors(path, {"embeddings": emb}, record)


def _damage(folder, how):
    good = _rows(4, 0)
    write_embeddings(folder, "c0", ["x0", "x1", "x2", "x3"], good, META)
    bad = chunk_path(folder, "c1")
    if how == "truncated":
        write_embeddings(folder, "c1", ["y0", "y1"], _rows(2, 1), META)
        bad.write_bytes(bad.read_bytes()[:-16])
    elif how == "not safetensors":
        bad.write_bytes(b"\x00" * 64)
    elif how == "empty file":
        bad.write_bytes(b"")
    elif how == "width differs from meta":
        _forge(bad, _rows(2, 1, dim=6))
    elif how == "keys != rows":
        _forge(bad, _rows(3, 1), keys=["y0", "y1"])
    elif how == "duplicate keys in a file":
        _forge(bad, _rows(2, 1), keys=["y0", "y0"])
    elif how == "duplicate keys across files":
        write_embeddings(folder, "c1", ["y0", "x2"], _rows(2, 1), META)
    elif how == "another model":
        write_embeddings(folder, "c1", ["y0"], _rows(1, 1), {**META, "model": "dinov3/k2-tiny-dinov3"})
    elif how == "another version":
        write_embeddings(folder, "c1", ["y0"], _rows(1, 1), {**META, "version": "sha256:ffffffffffffffff"})
    elif how == "another width":
        write_embeddings(folder, "c1", ["y0"], _rows(1, 1, dim=6), {**META, "dim": 6})
    elif how == "float16":
        _forge(bad, _rows(2, 1).astype(np.float16))
    return bad


DAMAGE = {"truncated": "is damaged or truncated", "not safetensors": "is damaged or truncated",
          "empty file": "is damaged or truncated", "width differs from meta": "holds 6-d rows but its meta says dim 8",
          "keys != rows": "has 2 keys for 3 rows", "duplicate keys in a file": "key 'y0' appears more than once",
          "duplicate keys across files": "", "another model": "is from model 'dinov3/k2-tiny-dinov3'",
          "another version": "is from version 'sha256:ffffffffffffffff'", "another width": "holds 6-d embeddings, expected 8",
          "float16": "holds float16 \\(2, 8\\), not float32"}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_chunk_raises_naming_its_file(tmp_path, how):
    bad = _damage(tmp_path, how)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + DAMAGE[how]) as caught:
        read_embeddings(tmp_path)
    if how == "duplicate keys across files":
        assert f"key 'x2' is in both embedding files {chunk_path(tmp_path, 'c0')} and" in str(caught.value)
    # the good chunk is still readable on its own: nothing already done is lost
    keys, emb, _ = read_embeddings(tmp_path, chunks=["c0"])
    assert keys == ["x0", "x1", "x2", "x3"] and np.array_equal(emb, _rows(4, 0))


def test_requests_the_chunks_do_not_meet_name_the_file(tmp_path):
    write_embeddings(tmp_path, "c0", ["x0"], _rows(1, 0), META)
    path = re.escape(str(chunk_path(tmp_path, "c0")))
    with pytest.raises(ValueError, match=f"{path} holds 8-d embeddings, expected 768"):
        read_embeddings(tmp_path, expect_dim=768)
    with pytest.raises(ValueError, match=f"{path} is from model .* expected 'dinov3/vitb16'"):
        read_embeddings(tmp_path, model="dinov3/vitb16")
    with pytest.raises(ValueError, match=f"{path} is from version .* expected 'sha256:1'"):
        read_embeddings(tmp_path, version="sha256:1")
    with pytest.raises(ValueError, match=f"{re.escape(str(chunk_path(tmp_path, 'c7')))} does not exist"):
        read_embeddings(tmp_path, chunks=["c0", "c7"])
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'nowhere'))} does not exist"):
        read_embeddings(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'empty'))} holds no"):
        read_embeddings(tmp_path / "empty")


def test_write_refuses_inconsistent_chunks(tmp_path):
    path = re.escape(str(chunk_path(tmp_path, "c0")))
    with pytest.raises(ValueError, match=f"{path}: 2 keys for 3 rows"):
        write_embeddings(tmp_path, "c0", ["a", "b"], _rows(3, 0), META)
    with pytest.raises(ValueError, match=f"{path} .*takes embeddings \\(N, 8\\), got shape \\(3, 6\\)"):
        write_embeddings(tmp_path, "c0", ["a", "b", "c"], _rows(3, 0, dim=6), META)
    with pytest.raises(ValueError, match=f"{path}: key 'a' appears more than once"):
        write_embeddings(tmp_path, "c0", ["a", "b", "a"], _rows(3, 0), META)
    with pytest.raises(ValueError, match="needs 'version'"):
        write_embeddings(tmp_path, "c0", ["a"], _rows(1, 0), {"model": "m", "dim": 8})
    with pytest.raises(ValueError, match="chunk name '../up'"):
        write_embeddings(tmp_path, "../up", ["a"], _rows(1, 0), META)
    assert not list(tmp_path.iterdir())  # nothing half-written
