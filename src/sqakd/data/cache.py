"""Decode image files once: a uint8 array cached as ``.npz``, keyed by what the files are.

The key is a SHA-256 of (absolute root, split, resize, and every file's relative path, size and
modification time), so adding, removing or touching a file decodes again. Files are written to a
temporary name and moved into place with ``os.replace``, so a reader never sees half a cache, and
loaded with ``allow_pickle=False``, so a cache file cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .decode import decode_images

log = logging.getLogger(__name__)

#: bump when decoding changes, so that old caches are not reused
CACHE_VERSION = 1
Size = tuple[int, int]


def cache_key(root: Path, split: str, resize: Size | None, paths: Sequence[str]) -> str:
    """SHA-256 (hex) of the root, split, resize and each file's relative path, size and mtime."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}\n{Path(root).absolute()}\n{split}\n{resize}\n".encode())
    for path in paths:
        stat = os.stat(path)
        relative = os.path.relpath(path, root)
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_file(cache_dir: Path, root: Path, split: str, key: str) -> Path:
    """Where the array for ``key`` lives: ``<cache_dir>/<root name>-<split>-<key prefix>.npz``."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(root).name}-{split}")
    return Path(cache_dir) / f"{readable}-{key[:24]}.npz"


def load_decoded(
    paths: Sequence[str],
    root: Path,
    split: str,
    resize: Size | None,
    cache_dir: Path | None,
) -> np.ndarray:
    """The decoded images of ``paths`` (see :func:`sqakd.data.decode.decode_images`), from the
    cache in ``cache_dir`` when it holds them, else decoded now and stored there.
    ``cache_dir=None`` decodes without caching."""
    if cache_dir is None:
        return decode_images(paths, resize)
    target = cache_file(cache_dir, root, split, cache_key(root, split, resize, paths))
    images = _read(target, len(paths))
    if images is not None:
        log.info("loaded %d decoded images from cache %s", len(images), target)
        return images
    images = decode_images(paths, resize)
    _write(target, images)
    return images


def _read(path: Path, expected: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            images = stored["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        log.warning("ignoring unreadable cache file %s (%s); decoding again", path, error)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != expected:
        log.warning("ignoring cache file %s with unexpected contents; decoding again", path)
        return None
    return images


def _write(path: Path, images: np.ndarray) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=path.stem + ".", suffix=".tmp", delete=False
        )
    except OSError as error:
        log.warning(
            "cannot write the image cache in %s (%s); continuing without it", path.parent, error
        )
        return
    try:
        with handle:
            np.savez(handle, images=images)
        os.chmod(handle.name, 0o644)  # temporary files start private; a cache is readable
        os.replace(handle.name, path)
        log.info("cached %d decoded images at %s", len(images), path)
    except OSError as error:
        log.warning("cannot write the image cache %s (%s); continuing without it", path, error)
    finally:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
