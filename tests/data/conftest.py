"""Helpers for the data tests: write small image files with known pixels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WriteImage = Callable[..., Path]


def _write_image(
    path: Path, value: int | tuple[int, int, int], size=(4, 5), mode: str = "RGB"
) -> Path:
    """A constant-colour image of ``size`` = (height, width); PNG/BMP/WEBP keep pixels exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    channels = 1 if mode == "L" else 3
    array = np.empty((height, width, channels), dtype=np.uint8)
    array[...] = value
    image = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)
    options = {"lossless": True} if path.suffix == ".webp" else {}
    image.save(path, **options)
    return path


@pytest.fixture
def write_image() -> WriteImage:
    """``write_image(path, value, size=(h, w), mode='RGB'|'L')`` writes a constant image."""
    return _write_image
