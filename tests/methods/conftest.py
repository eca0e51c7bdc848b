"""Real images for method tests, read straight from ../shared/data's tarball (never copied here)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

CIFAR10_TARBALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_images() -> torch.Tensor:
    """256 real CIFAR-10 test images (JPEG copy), standardised float NCHW."""
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"{CIFAR10_TARBALL} is missing")
    from PIL import Image

    arrays = []
    with tarfile.open(CIFAR10_TARBALL) as archive:
        for member in archive:
            if member.isfile() and "/test/" in f"/{member.name}" and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                arrays.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(arrays) == 256:
                    break
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (images - images.mean(dim=(0, 2, 3), keepdim=True)) / images.std(
        dim=(0, 2, 3), keepdim=True
    )
