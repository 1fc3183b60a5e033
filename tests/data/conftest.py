"""Shared fixtures for the data tests: the world, and the session's tiny text encoder (tests/conftest.py) loaded."""

import pytest

from data.shapes import ShapesWorld
from data.text import TextEncoder


@pytest.fixture(scope="session")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=32, seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_encoder_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(tiny_encoder_dir, layers=[1, 2, 3, 4], max_len=24)
