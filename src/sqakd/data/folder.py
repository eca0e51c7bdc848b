"""Class-folder trees: ``root/<split>/<class>/<image>`` (or ``root/<class>/<image>``).

Class names are the sorted folder names and a class's label is its index in that order (the
torchvision ``ImageFolder`` convention, so label indices agree with other tools).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .arrays import ImageArray
from .cache import load_decoded
from .files import list_images, split_directory
from .formats import Size, register_format


@register_format("folder")
def read_folder(root: Path, split: str, resize: Size | None, cache_dir: Path | None) -> ImageArray:
    """Labeled images from a class-folder tree; images inside a class folder may be nested."""
    base = split_directory(root, split)
    with os.scandir(base) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{base} has no class folders; expected {base}/<class name>/<image files> "
            "(use format 'unlabeled' for images without classes)"
        )
    paths: list[str] = []
    labels: list[np.ndarray] = []
    for label, name in enumerate(classes):
        files = list_images(base / name)
        if not files:
            raise ValueError(
                f"class folder {base / name} has no images (.jpg, .jpeg, .png, .bmp, .webp); "
                "add images or remove the folder"
            )
        paths.extend(files)
        labels.append(np.full(len(files), label, dtype=np.int64))
    images = load_decoded(paths, root, split, resize, cache_dir)
    return ImageArray(images, np.concatenate(labels), classes)
