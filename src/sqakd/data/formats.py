"""Data set readers by format name: adding a format means adding one file with ``@register_format``.

A reader is ``reader(root, split, resize, cache_dir) -> ImageArray`` where ``root`` is an absolute
``Path``, ``resize`` is ``(height, width)`` or ``None``, and ``cache_dir`` is where decoded arrays
may be cached (``None``: do not cache).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .arrays import ImageArray

Size = tuple[int, int]
Reader = Callable[[Path, str, "Size | None", "Path | None"], ImageArray]

_FORMATS: dict[str, Reader] = {}


def register_format(name: str) -> Callable[[Reader], Reader]:
    """Decorator: make ``reader`` available to :func:`load_images` under ``name``."""

    def add(reader: Reader) -> Reader:
        if name in _FORMATS:
            raise ValueError(f"data format {name!r} is registered twice")
        _FORMATS[name] = reader
        return reader

    return add


def available_formats() -> list[str]:
    """Names of every registered data format, sorted."""
    return sorted(_FORMATS)


def default_cache_dir() -> Path:
    """``$SQAKD_CACHE`` if set, else ``~/.cache/sqakd``."""
    return Path(os.environ.get("SQAKD_CACHE") or Path.home() / ".cache" / "sqakd")


def check_resize(resize: Sequence[int] | None) -> Size | None:
    """Return ``resize`` as ``(height, width)`` of positive ints, or raise a ``ValueError``."""
    if resize is None:
        return None
    if isinstance(resize, int | str) or len(resize) != 2:
        raise ValueError(f"resize must be (height, width), e.g. [32, 32]; got {resize!r}")
    if not all(
        isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in resize
    ):
        raise ValueError(
            f"resize must be two positive whole numbers (height, width); got {resize!r}"
        )
    return int(resize[0]), int(resize[1])


def load_images(
    format: str,
    root: str | os.PathLike[str],
    split: str = "train",
    resize: Sequence[int] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    cache: bool = True,
) -> ImageArray:
    """Read the ``split`` of the data set at ``root`` stored in ``format``.

    ``resize=(h, w)`` resizes every image (bilinear). Decoded image files are cached as uint8
    arrays in ``cache_dir`` (default :func:`default_cache_dir`) unless ``cache=False``.
    """
    try:
        reader = _FORMATS[format]
    except KeyError:
        raise ValueError(
            f"unknown data format {format!r}; choose one of: {', '.join(available_formats())}"
        ) from None
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a folder or split name such as 'train', got {split!r}")
    size = check_resize(resize)
    directory = (
        (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cache else None
    )
    return reader(Path(root).expanduser().absolute(), split, size, directory)
