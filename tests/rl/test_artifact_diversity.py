"""The artifact and diversity rewards on open_clip's tiny random tower (rl.rewards.embed):
corruptions, the artifact head's held-out separation and its folder, group diversity
against a numpy reference."""

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data.shapes import ShapesWorld
from rl.rewards import build_reward
from rl.rewards.artifact import (KINDS, ArtifactReward, build, corrupt, corrupted_copies, gaussian_noise, grid_pattern,
                                 jpeg_blocks, main, over_saturation, train_artifact_head)
from rl.rewards.diversity import DiversityReward
from rl.rewards.embed import DEFAULT_MODEL, ImageEmbedder

# The head's held-out accuracy per kind, measured with the tiny tower (512 images, seed 0):
# clean 0.992, jpeg 0.965, noise 0.996, grid 0.988, saturation 0.965 (seed 1: jpeg 0.949,
# the lowest). On the 64 fresh images below: clean 1.0, jpeg 0.938, saturation 0.969,
# noise and grid 1.0 (128 fresh images, other draws: jpeg 0.934-0.945, saturation
# 0.938-0.957). Everything is deterministic; the bounds leave room for another torch or
# timm build moving a few scores across 1/2.
MIN_REPORTED_ACCURACY = 0.9
MIN_FRESH_ACCURACY = 0.88


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32, seed=0)


@pytest.fixture(scope="module")
def embedder():
    return ImageEmbedder.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def trained(world, embedder):
    return train_artifact_head(world, embedder, num_images=512, seed=0)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifact") / "head"
    trained.save(folder)
    return folder


# ---- corruptions -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_each_corruption_changes_the_image_and_keeps_its_format(world, kind):
    for i in range(8):
        image = world.sample(i)[0]
        before = image.copy()
        out = corrupt(image, kind, np.random.default_rng([5, i]))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert (out != image).any(), (kind, i)
        np.testing.assert_array_equal(image, before)  # the input is left alone
        np.testing.assert_array_equal(out, corrupt(image, kind, np.random.default_rng([5, i])))  # seeded
    big = ShapesWorld(image_size=64).sample(0)[0]
    assert corrupt(big, kind, np.random.default_rng(0)).shape == (64, 64, 3)


def test_corruptions_do_what_they_say():
    grey = np.full((32, 32, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    # noise: the difference has the asked std (no clipping around 128)
    noise = gaussian_noise(grey, rng, sigma=16.0).astype(float) - 128
    assert abs(noise.std() - 16.0) < 0.5 and abs(noise.mean()) < 0.5
    # grid: +-amplitude on the pattern, 0 elsewhere; lines repeat every period, a checker's
    # cells alternate every period
    lines = grid_pattern(grey, rng, period=4, amplitude=40.0, style="lines").astype(int) - 128
    assert set(np.unique(lines)) in ({0, 40}, {0, -40})
    assert (lines != 0).mean() == 1 - (3 / 4) ** 2  # one row and one column in four
    np.testing.assert_array_equal(lines[:-4], lines[4:])
    np.testing.assert_array_equal(lines[:, :-4], lines[:, 4:])
    checker = grid_pattern(grey, rng, period=4, amplitude=40.0, style="checker").astype(int) - 128
    assert set(np.unique(checker)) in ({0, 40}, {0, -40})
    on = checker != 0
    assert on.mean() == 0.5
    np.testing.assert_array_equal(on[:-4], ~on[4:])
    np.testing.assert_array_equal(on[:, :-4], ~on[:, 4:])
    # saturation: grey has no colour to push; a colour moves away from its grey
    np.testing.assert_array_equal(corrupt(grey, "saturation", rng), grey)
    tan = np.full((8, 8, 3), (170, 130, 100), np.uint8)
    out = over_saturation(tan, rng, factor=2.0).astype(int)
    assert out[0, 0, 0] > 170 and out[0, 0, 2] < 100
    # jpeg: PIL's own JPEG round trip at the asked quality
    image = ShapesWorld(image_size=32).sample(3)[0]
    out = jpeg_blocks(image, rng, quality=10)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=10)
    np.testing.assert_array_equal(out, np.asarray(Image.open(buffer).convert("RGB")))


def test_corrupt_rejects_unknown_kinds_and_formats(world):
    image = world.sample(0)[0]
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        corrupt(image, "blur", np.random.default_rng(0))
    with pytest.raises(ValueError, match="RGB uint8"):
        corrupt(image.astype(np.float32), "noise", np.random.default_rng(0))


# ---- the artifact head -------------------------------------------------------------------------
def test_head_separates_heldout_clean_images_from_each_corruption(world, trained):
    report = trained.info["heldout_accuracy"]
    assert set(report) == {"clean", *KINDS}
    assert min(report.values()) >= MIN_REPORTED_ACCURACY, report
    # and on images the training never drew: other world indices, other corruption draws
    indices = range(100_000, 100_064)
    clean = np.stack([world.sample(i)[0] for i in indices])
    out = trained(clean, ["a red circle"] * len(clean))
    assert out.scores.dtype == torch.float32 and ((out.scores >= 0) & (out.scores <= 1)).all()
    assert torch.equal(out.details["artifact"], out.scores)
    clean_ok = (out.scores > 0.5).float()
    assert clean_ok.mean() >= MIN_FRESH_ACCURACY
    for kind, images in corrupted_copies(clean, indices, KINDS, seed=7).items():
        caught = (trained(images, ["a red circle"] * len(images)).scores <= 0.5).float()
        accuracy = torch.cat([clean_ok, caught]).mean().item()
        assert accuracy >= MIN_FRESH_ACCURACY, (kind, accuracy)


def test_saved_head_loads_to_the_same_scores(world, trained, saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["embedder"]["model"] == DEFAULT_MODEL and config["embedder"]["pretrained"] is None
    assert config["seed"] == 0 and config["heldout_accuracy"] == trained.info["heldout_accuracy"]
    images = np.stack([world.sample(i)[0] for i in range(6)])
    images = np.concatenate([images, corrupted_copies(images, range(6), KINDS, seed=1)["grid"]])
    prompts = [world.sample(i)[1] for i in range(6)] * 2
    expected = trained(images, prompts).scores
    torch.manual_seed(123)  # the tower is rebuilt from the saved seed, whatever the caller's stream
    torch.rand(10)
    loaded = build(world, path=saved)
    assert torch.equal(loaded(images, prompts).scores, expected)
    combined = build_reward({"artifact": 1.0}, world, options={"artifact": {"path": str(saved)}})
    assert torch.equal(combined(images, prompts).details["artifact"], expected)


def test_cli_trains_a_folder_that_loads(world, tmp_path, capsys):
    out = tmp_path / "cli"
    config = main(["--out", str(out), "--images", "32", "--steps", "100"])
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "step 100/100" in printed and f"saved {out}" in printed
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(config))
    assert config["training"]["num_images"] == 32 and config["embedder"]["model"] == DEFAULT_MODEL
    assert build(world, path=out).info["heldout_accuracy"] == config["heldout_accuracy"]
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        main(["--out", str(out), "--images", "32", "--steps", "1"])


def _damage(folder, how):
    config = json.loads((folder / "config.json").read_text())
    if how == "missing head":
        (folder / "head.safetensors").unlink()
    elif how == "truncated head":
        data = (folder / "head.safetensors").read_bytes()
        (folder / "head.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "config not json":
        (folder / "config.json").write_text("{not json")
    elif how == "config without the tower":
        del config["embedder"]
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "unknown model":
        config["embedder"].update(model="no-such-tower", model_config=None)
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "head of another width":
        save_file({"mean": torch.zeros(256), "std": torch.ones(256), "weight": torch.zeros(256),
                   "bias": torch.zeros(1)}, str(folder / "head.safetensors"))


@pytest.mark.parametrize("how", ["missing head", "truncated head", "config not json", "config without the tower",
                                 "unknown model", "head of another width"])
def test_damaged_folder_raises_naming_it(world, trained, tmp_path, how):
    folder = tmp_path / "head"
    trained.save(folder)
    _damage(folder, how)
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        build(world, path=folder)


def test_missing_folder_or_path_raises(world, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nowhere"))):
        ArtifactReward.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs options"):
        build(world)


# ---- diversity ---------------------------------------------------------------------------------
def _reference_diversity(embeddings: np.ndarray, prompts: list[str]) -> np.ndarray:
    """float64 numpy: mean over the other members of the prompt's group of 1 - cosine."""
    e = embeddings.astype(np.float64)
    out = np.zeros(len(prompts))
    for i, p in enumerate(prompts):
        others = [j for j, q in enumerate(prompts) if q == p and j != i]
        for j in others:
            out[i] += 1 - e[i] @ e[j] / (np.linalg.norm(e[i]) * np.linalg.norm(e[j]))
        out[i] /= max(len(others), 1)
    return out


def test_diversity_is_mean_cosine_distance_within_groups(world, embedder):
    reward = DiversityReward(embedder)
    a, b, c = "a red circle", "a blue square", "a green triangle"
    # groups of 4 and 3, interleaved, and one of one
    prompts = [a, b, a, b, a, c, b, a]
    images = np.stack([world.render(p, np.random.default_rng(i)) for i, p in enumerate(prompts)])
    out = reward(images, prompts)
    expected = _reference_diversity(reward.embedder(images).numpy(), prompts)
    np.testing.assert_allclose(out.scores.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert out.scores.dtype == torch.float32 and torch.equal(out.details["diversity"], out.scores)
    assert out.scores[5] == 0.0  # alone in its group
    assert (out.scores[[0, 1, 2, 3, 4, 6, 7]] > 1e-4).all()  # distinct images differ (the tiny tower: by 1e-3 and more)
    # groups do not mix: each group scores as it does alone
    for prompt in (a, b):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        alone = reward(images[idx], [prompt] * len(idx)).scores
        torch.testing.assert_close(out.scores[idx], alone, rtol=1e-6, atol=1e-7)
    # through the registry, the same tower by default
    built = build_reward({"diversity": 1.0}, world)
    torch.testing.assert_close(built(images, prompts).details["diversity"], out.scores, rtol=0, atol=0)


def test_identical_images_score_zero(world, embedder):
    reward = DiversityReward(embedder)
    image = world.sample(4)[0]
    other = world.sample(5)[0]
    images = np.stack([image, image, image, other, other])
    out = reward(images, ["x", "x", "x", "y", "y"])
    assert out.scores.abs().max() < 1e-6
    assert reward(images[[0, 3]], ["x", "x"]).scores.min() > 1e-3  # the same two, different, do not
