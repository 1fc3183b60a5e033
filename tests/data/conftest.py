"""Shared fixtures for the data tests: one tiny text encoder per session."""

import pytest

from data.shapes import ShapesWorld
from data.text import TextEncoder, build_tiny_encoder


@pytest.fixture(scope="session")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, world) -> str:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"), world.all_captions(), seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_encoder_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(tiny_encoder_dir, layers=[1, 2, 3, 4], max_len=24)
