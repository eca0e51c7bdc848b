"""Unlabeled image trees: every image file under ``root`` (or ``root/<split>``) at any depth."""

from __future__ import annotations

from pathlib import Path

from .arrays import ImageArray
from .cache import load_decoded
from .files import list_images, no_images_error, split_directory
from .formats import Size, register_format


@register_format("unlabeled")
def read_unlabeled(
    root: Path, split: str, resize: Size | None, cache_dir: Path | None
) -> ImageArray:
    """Images in sorted path order, with no labels or classes.

    Reads ``root/<split>`` when that folder exists, else the whole of ``root``.
    """
    base = split_directory(root, split)
    paths = list_images(base)
    if not paths:
        raise no_images_error(base)
    return ImageArray(load_decoded(paths, root, split, resize, cache_dir))
