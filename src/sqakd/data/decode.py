"""Decoding image files with Pillow into one uint8 (N, H, W, C) array, in parallel processes.

Grey images (Pillow modes 1, L, LA) decode to one channel and everything else to RGB. A set
whose images are all grey stays grey (C = 1); a mixed set is RGB, grey images having R = G = B.
Resizing, when asked for, is bilinear to ``(height, width)``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

Size = tuple[int, int]
GREY_MODES = frozenset({"1", "L", "LA"})
#: below this many files decoding stays in this process (a pool costs more than it saves)
SERIAL_LIMIT = 1000


def decode_image(path: str, resize: Size | None = None) -> np.ndarray:
    """One image file as a uint8 (H, W, 1) or (H, W, 3) array; a bad file raises ``ValueError``."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in GREY_MODES else "RGB")
            if resize is not None:
                image = image.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"cannot decode image {path} ({error}); delete or replace the file"
        ) from None
    return array[:, :, None] if array.ndim == 2 else array


def _decode_chunk(paths: Sequence[str], resize: Size | None) -> list[np.ndarray]:
    return [decode_image(path, resize) for path in paths]


def default_workers() -> int:
    """``$SQAKD_DECODE_WORKERS`` if set, else the CPU cores this process may use (at most 8)."""
    given = os.environ.get("SQAKD_DECODE_WORKERS")
    if given:
        if not given.isdigit():
            raise ValueError(f"SQAKD_DECODE_WORKERS must be a whole number, got {given!r}")
        return max(1, int(given))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def decode_images(
    paths: Sequence[str], resize: Size | None = None, workers: int | None = None
) -> np.ndarray:
    """Decode ``paths`` in order into a uint8 array (N, H, W, C).

    Raises ``ValueError`` naming the file for an unreadable image, and naming two files and their
    sizes when images differ in size and ``resize`` is not set.
    """
    if not paths:
        raise ValueError("no image files to decode")
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1 or len(paths) < SERIAL_LIMIT:
        return _assemble(paths, [_decode_chunk(paths, resize)])
    chunk = math.ceil(len(paths) / (workers * 8))
    chunks = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        try:
            return _assemble(paths, pool.map(_decode_chunk, chunks, [resize] * len(chunks)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    except (OSError, BrokenProcessPool) as error:  # no usable process pool: decode here instead
        log.warning("parallel decoding failed (%s); decoding in this process", error)
        return _assemble(paths, [_decode_chunk(paths, resize)])


def _assemble(paths: Sequence[str], chunks) -> np.ndarray:
    """Copy decoded images into one array, checking sizes and reducing all-grey sets to C = 1."""
    out: np.ndarray | None = None
    all_grey = True
    index = 0
    for decoded in chunks:
        for image in decoded:
            if out is None:
                out = np.empty((len(paths), image.shape[0], image.shape[1], 3), dtype=np.uint8)
            elif image.shape[:2] != out.shape[1:3]:
                raise ValueError(
                    _size_mismatch(paths[0], out.shape[1:3], paths[index], image.shape)
                )
            out[index] = image  # a grey (H, W, 1) image broadcasts to R = G = B
            all_grey = all_grey and image.shape[2] == 1
            index += 1
    assert out is not None and index == len(paths)
    return np.ascontiguousarray(out[..., :1]) if all_grey else out


def _size_mismatch(first: str, first_shape, other: str, other_shape) -> str:
    height, width = first_shape[:2]
    return (
        f"images differ in size: {first} is {height}x{width} but {other} is "
        f"{other_shape[0]}x{other_shape[1]} (height x width); set data.resize "
        f"(e.g. [{height}, {width}]) to resize them all"
    )


def resize_images(images: np.ndarray, resize: Size) -> np.ndarray:
    """Resize every image of a uint8 (N, H, W, C) array to ``resize`` (bilinear, Pillow)."""
    height, width = resize
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, images.shape[3]), dtype=np.uint8)
    for index, image in enumerate(images):
        picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        resized = np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR))
        out[index] = resized.reshape(height, width, -1)
    return out
