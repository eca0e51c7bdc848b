"""Real CIFAR-10 images (read straight from ../shared/data's tarball, never copied) and briefly
trained models for the export tests."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from export_cases import SmallNet, train_briefly
from torch import nn

CIFAR10_TARBALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
#: sorted class names = label indices
CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
PER_CLASS = 30
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)


@pytest.fixture(scope="session")
def cifar_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """300 real CIFAR-10 test images (30 per class), standardised NCHW float, and their labels."""
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"{CIFAR10_TARBALL} is missing")
    from PIL import Image

    arrays: list[np.ndarray] = []
    labels: list[int] = []
    counts = dict.fromkeys(CLASSES, 0)
    with tarfile.open(CIFAR10_TARBALL) as archive:
        for member in archive:
            parts = member.name.split("/")
            wanted = member.isfile() and parts[0] == "test" and len(parts) == 3
            if not wanted or counts.get(parts[1], PER_CLASS) >= PER_CLASS:
                continue
            data = archive.extractfile(member).read()  # type: ignore[union-attr]
            arrays.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(CLASSES.index(parts[1]))
            counts[parts[1]] += 1
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (images - MEAN) / STD, torch.tensor(labels)


@pytest.fixture(scope="session")
def small_net_state(cifar_batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return train_briefly(SmallNet(), *cifar_batch, steps=30)


@pytest.fixture
def small_net(small_net_state) -> Callable[[], nn.Module]:
    """Builds the briefly trained :class:`SmallNet` (a fresh copy at each call)."""

    def build() -> nn.Module:
        model = SmallNet()
        model.load_state_dict(small_net_state)
        return model.eval()

    return build
