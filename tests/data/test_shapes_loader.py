"""ShapesLoader: world-size independent, exactly resumable, deterministic caption dropout."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from data.batch import Batch
from data.config import DataConfig
from data.latents import PixelLatents
from data.shapes_loader import ShapesLoader, build_shapes_data, ensure_tiny_encoder


def _loader(encoder, batch_size, rank=0, world_size=1, **cfg):
    return ShapesLoader(DataConfig(**cfg), encoder, PixelLatents(), batch_size, rank, world_size)


def _assert_batches_equal(a: Batch, b: Batch):
    assert a.captions == b.captions
    for name in ("latents", "text", "text_mask", "sample_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _concat(batches: list[Batch]) -> Batch:
    return Batch(torch.cat([b.latents for b in batches]), torch.cat([b.text for b in batches]),
                 torch.cat([b.text_mask for b in batches]), torch.cat([b.sample_ids for b in batches]),
                 [c for b in batches for c in b.captions])


def test_batch_contents_come_from_the_world(encoder, world):
    batch = next(_loader(encoder, 4, caption_dropout=0.0))
    assert batch.sample_ids.tolist() == [0, 1, 2, 3]
    assert batch.latents.shape == (4, 3, 32, 32) and batch.text.shape == (4, 24, 4, 128)
    for i in range(4):
        image, caption = world.sample(i)
        assert batch.captions[i] == caption
        expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(batch.latents[i], expected)
        feats, mask = encoder.encode([caption])
        assert torch.equal(batch.text[i], feats[0]) and torch.equal(batch.text_mask[i], mask[0])


def test_one_rank_at_b8_equals_two_ranks_at_b4(encoder):
    single = _loader(encoder, 8)
    ranks = [_loader(encoder, 4, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        whole = next(single)
        assert whole.sample_ids.tolist() == list(range(8 * step, 8 * step + 8))
        _assert_batches_equal(whole, _concat([next(r) for r in ranks]))


def test_resume_from_state_dict_is_exact(encoder):
    loader = _loader(encoder, 4, rank=1, world_size=2)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    assert state == {"samples_seen": 24}
    expected = [next(loader) for _ in range(2)]
    resumed = _loader(encoder, 4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        _assert_batches_equal(next(resumed), want)


def test_resume_on_another_world_size_continues_the_global_stream(encoder):
    two = [_loader(encoder, 4, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        for r in two:
            next(r)
    state = two[0].state_dict()
    assert state == two[1].state_dict() == {"samples_seen": 16}
    expected = _concat([next(r) for r in two])
    one = _loader(encoder, 8)
    one.load_state_dict(state)
    _assert_batches_equal(next(one), expected)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        _loader(encoder, 3, world_size=2).load_state_dict(state)


def test_caption_dropout_is_deterministic_and_near_rate(encoder):
    a = _loader(encoder, 1, caption_dropout=0.3)
    b = _loader(encoder, 1, caption_dropout=0.3)
    dropped = [a.caption_dropped(i) for i in range(4000)]
    assert dropped == [b.caption_dropped(i) for i in range(4000)]
    assert abs(np.mean(dropped) - 0.3) < 0.03
    # a different seed drops different samples
    assert dropped != [_loader(encoder, 1, caption_dropout=0.3, seed=1).caption_dropped(i) for i in range(4000)]
    # and the batches carry it: dropped samples get the empty prompt's features
    loader = _loader(encoder, 16, caption_dropout=0.3)
    batch = next(loader)
    empty, empty_mask = encoder.encode([""])
    for i, sid in enumerate(batch.sample_ids.tolist()):
        assert (batch.captions[i] == "") == dropped[sid]
        if dropped[sid]:
            assert torch.equal(batch.text[i], empty[0]) and torch.equal(batch.text_mask[i], empty_mask[0])
    assert not any(_loader(encoder, 1, caption_dropout=0.0).caption_dropped(i) for i in range(200))


def test_every_caption_fits_the_default_text_len(encoder, world):
    _, mask_BS = encoder.tokenize(world.all_captions())
    assert (mask_BS.sum(1) - encoder.prefix_len).max() < DataConfig().text_len


def test_build_shapes_data_builds_the_encoder_once_even_when_racing(tmp_path, tiny_encoder_dir):
    cfg = DataConfig(caption_dropout=0.0)
    results, errors = [], []

    def build(rank):
        try:
            results.append(build_shapes_data(cfg, tmp_path, batch_size=2, rank=rank, world_size=2))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder"]  # no temp folders left behind
    (loader_a, enc_a, lat_a, world_a), (loader_b, enc_b, *_) = results
    assert (enc_a.dim, enc_a.num_layers, lat_a.channels, world_a.image_size) == (128, 4, 3, 32)
    assert torch.equal(enc_a.encode(["a red circle"])[0], enc_b.encode(["a red circle"])[0])
    assert ensure_tiny_encoder(tmp_path / "text_encoder", ["unused"]) == str(tmp_path / "text_encoder")
    assert sorted(b.loader.rank for b in results) == [0, 1]


def test_config_and_loader_reject_bad_values(encoder):
    with pytest.raises(ValueError):
        DataConfig(caption_dropout=1.5)
    with pytest.raises(ValueError):
        _loader(encoder, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="text_len"):
        _loader(encoder, 4, text_len=16)


def test_losing_the_build_race_keeps_the_winners_copy(tmp_path):
    from data.shapes_loader import _publish

    final = tmp_path / "text_encoder"

    def fill_then_lose(tmp):
        (Path(tmp) / "config.json").write_text("{}")
        final.mkdir()  # meanwhile another rank finished and renamed first
        (final / "config.json").write_text("{}")
        (final / "winner").write_text("")

    _publish(final, fill_then_lose)
    assert (final / "winner").exists()  # the winner's folder was not replaced
    assert [p.name for p in tmp_path.iterdir()] == ["text_encoder"]  # the loser's copy is gone


def test_tiny_encoder_cache_is_reused_and_every_run_gets_its_own_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_CACHE_DIR", str(tmp_path / "cache"))
    texts = ["a red circle", "a blue square"]
    first = Path(ensure_tiny_encoder(tmp_path / "run1" / "text_encoder", texts))
    (entry,) = (tmp_path / "cache" / "tiny_encoders").iterdir()
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    second = Path(ensure_tiny_encoder(tmp_path / "run2" / "text_encoder", texts))
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert not (second / "model.safetensors").samefile(entry / "model.safetensors")  # a copy, not a link
    ensure_tiny_encoder(tmp_path / "run3" / "text_encoder", texts + ["a green triangle"])
    assert len(list((tmp_path / "cache" / "tiny_encoders").iterdir())) == 2  # other texts, another build
