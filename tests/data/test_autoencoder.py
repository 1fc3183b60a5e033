"""The shapes-world autoencoder: a briefly trained one reconstructs world images (pink too),
its latents are normalised, a saved folder loads bitwise, and shards written with it decode
back to the images."""

import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from data.autoencoder import (GRID, AEConfig, ShapesAutoencoder, ensure_autoencoder, fit, held_out_images, main,
                              settings_from_args, training_images, write_folder)
from data.latents import ShapesAELatents, images_from_uint8, images_to_uint8, make_latents
from data.shapes import ShapesWorld

# ~15 s on one CPU thread. Its figures (this machine): MAE ~5.5/255, colours always kept;
# the full default (4000 steps, width 48) reaches MAE ~2.4 and 88% verifier agreement.
BRIEF = AEConfig(width=32, max_width=64, steps=1000, batch_size=16, num_images=1024, num_eval=64)
MAX_MAE = 8.0  # per pixel and channel, [0, 255] units; an untrained net is at ~90
TINY = dict(width=8, max_width=16, steps=20, batch_size=8, num_images=64, num_eval=8)  # folder plumbing only


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside conftest's one-thread fixture
    try:
        return fit(BRIEF, progress=None)
    finally:
        torch.set_num_threads(threads)


def test_round_trip_of_a_briefly_trained_autoencoder_keeps_world_images(trained):
    latents, config, _ = trained
    assert (latents.channels, latents.downsample, latents.kind) == (4, 4, "shapes_ae")
    report = config["reconstruction"]
    assert report["num_images"] == 64 and set(report["streams"]) == {"shapes", "pink"}
    assert report["mae"] < MAX_MAE and report["streams"]["pink"]["mae"] < MAX_MAE
    # The verifier still reads every colour, pink (which pretraining never draws) included.
    assert report["changed"]["colours"] == 0.0 and report["changed"]["relation"] <= 0.05
    assert report["agreement"] >= 0.4  # ~0.67 here; shapes (small squares) are what it still loses
    # The report's MAE is what it says: recomputed here from the round trip.
    images, _ = held_out_images(BRIEF)["pink"]
    recon = images_to_uint8(latents.decode(latents.encode(images_from_uint8(images))))
    mae = (recon.int() - images.int()).abs().float().mean().item()
    assert mae == pytest.approx(report["streams"]["pink"]["mae"], abs=1e-3)


def test_encoded_latents_are_normalised_per_channel(trained):
    latents, _, _ = trained
    pool = latents.encode(images_from_uint8(training_images(BRIEF)))
    assert pool.shape == (BRIEF.num_images, 4, 8, 8) and pool.dtype == torch.float32 and not pool.requires_grad
    torch.testing.assert_close(pool.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(pool.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)
    # Held-out images come from the same distribution: about N(0, 1) there too.
    held = torch.cat([latents.encode(images_from_uint8(im)) for im, _ in held_out_images(BRIEF).values()])
    assert held.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert (held.std(dim=(0, 2, 3)) - 1).abs().max() < 0.2


def test_saved_folder_loads_bitwise_the_same(trained, tmp_path):
    latents, config, grid = trained
    write_folder(tmp_path / "ae", latents, config, grid)
    assert sorted(os.listdir(tmp_path / "ae")) == ["config.json", "model.safetensors", GRID]
    loaded = make_latents("shapes_ae", str(tmp_path / "ae"))
    assert isinstance(loaded, ShapesAELatents) and (loaded.channels, loaded.downsample) == (4, 4)
    x = images_from_uint8(held_out_images(BRIEF)["shapes"][0])
    z = latents.encode(x)
    assert torch.equal(loaded.encode(x), z)
    assert torch.equal(loaded.decode(z), latents.decode(z))
    saved = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert saved["settings"] == asdict(BRIEF) and saved["architecture"]["channels"] == 4
    assert saved["latents_mean"] == latents.mean_1C11.flatten().tolist()


def test_writer_shards_loader_decode_gives_back_the_images(trained, tmp_path, encoder):
    from data.shard_loader import ShardLoader, ShardReader
    from data.writer import WriterConfig, write_shards

    latents, config, grid = trained
    write_folder(tmp_path / "ae", latents, config, grid)
    loaded = ShapesAELatents.from_pretrained(tmp_path / "ae")
    cfg = WriterConfig(resolution=32, bucket_multiple=16, micro_batch=8)
    index = write_shards("shapes:16:32", str(tmp_path / "shards"), loaded, encoder, cfg, chunk_size=8, progress=None)
    assert index["latents"] == {"kind": "shapes_ae", "channels": 4, "downsample": 4} and index["total"] == 16

    loader = ShardLoader(str(tmp_path / "shards"), batch_size=4, text_len=encoder.max_len, num_workers=0)
    reader = ShardReader(loader.index, encoder.max_len)
    world, seen = ShapesWorld(32), set()
    for _ in range(4):  # one epoch
        batch = next(loader)
        assert batch.latents.shape == (4, 4, 8, 8)
        decoded = images_to_uint8(loaded.decode(batch.latents))
        for i, sample_id in enumerate(batch.sample_ids.tolist()):
            record, _ = reader.sample(sample_id % loader.index.total)
            index_in_world = int(record["source"].rsplit("/", 1)[1])
            image, caption = world.sample(index_in_world)
            assert record["caption"] == caption
            assert np.abs(decoded[i].numpy().astype(int) - image).mean() < MAX_MAE
            direct = loaded.decode(loaded.encode(images_from_uint8(torch.from_numpy(image)[None])))
            # float16 storage of unit-scale latents moves a decoded pixel by well under one level.
            assert (images_to_uint8(direct)[0].int() - decoded[i].int()).abs().max() <= 2
            seen.add(index_in_world)
    assert seen == set(range(16))


def test_ensure_autoencoder_caches_refuses_other_settings_and_leaves_no_temp(tmp_path):
    cfg = AEConfig(**TINY)
    out = tmp_path / "ae"
    first = ensure_autoencoder(out, cfg, progress=None)
    assert first["settings"] == asdict(cfg) and (out / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["ae"]  # the temp folder was renamed, nothing left beside it
    stamp = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    lines = []
    assert ensure_autoencoder(out, cfg, progress=lines.append) == first
    assert "cached" in lines[0] and {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamp
    with pytest.raises(ValueError, match="other settings.*'steps': \\(20, 21\\)"):
        ensure_autoencoder(out, AEConfig(**{**TINY, "steps": 21}), progress=None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a finished autoencoder folder"):
        ensure_autoencoder(tmp_path / "junk", cfg, progress=None)


def test_cli_trains_writes_the_grid_and_is_cached(tmp_path, capsys):
    out = str(tmp_path / "ae")
    args = ["--out", out, "--width", "8", "--max-width", "16", "--steps", "20", "--batch-size", "8",
            "--num-images", "64", "--num-eval", "8", "--threads", "1"]
    config = main(args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["mae"] == config["reconstruction"]["mae"] and printed["num_images"] == 8
    # Top-left grid cell: the first held-out original, upscaled (originals above, reconstructions below).
    grid = np.asarray(Image.open(os.path.join(out, GRID)))
    first = held_out_images(AEConfig(**TINY))["shapes"][0][0].numpy()
    scale = 96 // 32
    assert np.array_equal(grid[4:4 + 96, 4:4 + 96], first.repeat(scale, 0).repeat(scale, 1))
    assert grid.shape == (2 * 1 * (96 + 4) + 3 * 4, 8 * (96 + 4) + 4, 3)  # 8 images a block, one row each
    main(args)
    assert "cached" in capsys.readouterr().out


def test_settings_and_other_geometries():
    assert settings_from_args(["downsample=8", "channels=8", "lr=0.001"], resolution=64) == AEConfig(
        resolution=64, downsample=8, channels=8, lr=0.001)
    assert AEConfig(resolution=64, downsample=8).crop == 32  # default crop: 4 latent cells
    with pytest.raises(ValueError, match="KEY=VALUE"):
        settings_from_args(["depth=3"])
    with pytest.raises(ValueError, match="downsample must be a power of two"):
        AEConfig(downsample=3)
    with pytest.raises(ValueError, match="resolution must be"):
        AEConfig(resolution=36, downsample=8)
    # 64 px at 8x: 8x8x8 latents; any multiple of the factor works (buckets need not be square).
    for cfg in (AEConfig(resolution=64, downsample=8, channels=8), AEConfig(resolution=64, downsample=8, patch=4)):
        model = ShapesAutoencoder(cfg)
        z = model.encode(torch.zeros(2, 3, 64, 48))
        assert z.shape == (2, cfg.channels, 8, 6) and model.decode(z).shape == (2, 3, 64, 48)


def test_make_latents_needs_a_trained_folder(tmp_path):
    with pytest.raises(ValueError, match="vae_path"):
        make_latents("shapes_ae")
    with pytest.raises(ValueError, match="python -m data.autoencoder"):
        make_latents("shapes_ae", str(tmp_path))
    latents = ShapesAELatents(ShapesAutoencoder(AEConfig()), [0.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="not divisible by the autoencoder factor 4"):
        latents.encode(torch.zeros(1, 3, 30, 32))
