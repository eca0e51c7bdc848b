"""A tiny image-folder data set and teacher for end-to-end runs of the real command line in
subprocesses (torchrun, SIGKILL): 2 classes of 8x8 RGB PNG files generated here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 6


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/*.png (16 per class) and test/<class>/*.png (6 per class), 8x8 RGB; class
    "bright" is brighter than class "dark" so that accuracy means something."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, (name, low) in enumerate((("dark", 0), ("bright", 96))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(low, low + 160, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}_{index}.png")
    return root


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (randomly initialised) small_cnn teacher for the tiny data, as safetensors."""
    from sqakd.engine import save_weights
    from sqakd.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, in_channels=3, width=8)
    return save_weights(model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
