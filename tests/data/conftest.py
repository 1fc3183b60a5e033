"""Shared fixtures for the data tests: one tiny text encoder per session."""

import pytest
import torch

from data.shapes import ShapesWorld
from data.text import TextEncoder, build_tiny_encoder


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models are far faster single-threaded: with 2 cores shared by other jobs,
    # intra-op thread sync costs ~20x. Restored so tests outside tests/data are unaffected.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, world) -> str:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"), world.all_captions(), seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_encoder_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(tiny_encoder_dir, layers=[1, 2, 3, 4], max_len=24)
