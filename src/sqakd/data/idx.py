"""IDX files (the MNIST / Fashion-MNIST format), raw or gzip-compressed.

An IDX file starts with the magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian
uint32 sizes, then the values in row-major order. Images are ``(N, H, W)`` unsigned bytes
(magic 2051), labels ``(N,)`` unsigned bytes (magic 2049). A folder holds the standard names
``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; split ``"test"`` reads the ``t10k`` files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .arrays import ImageArray
from .decode import resize_images
from .formats import Size, check_resize, register_format

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(digit) for digit in range(10)]

#: IDX type code -> numpy dtype (big-endian where it matters)
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
STANDARD_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """The array stored in one IDX file (gzip detected from its first bytes).

    ``ndim`` checks the number of dimensions in the magic number; a bad magic number or a file
    whose length does not match its header raises ``ValueError``.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            content = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path} ({error}); the file is damaged") from None
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {content[:4].hex()})")
    dims = content[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path} holds a {dims}-d IDX array, expected {ndim}-d")
    header = 4 + 4 * dims
    shape = tuple(int(size) for size in np.frombuffer(content[4:header], dtype=">u4"))
    dtype = np.dtype(IDX_TYPES[content[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(content) != expected:
        raise ValueError(
            f"{path} is {len(content)} bytes but its header {shape} needs {expected}; the file is damaged"
        )
    return (
        np.frombuffer(content, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find(root: Path, prefix: str, kind: str) -> Path | None:
    """``<prefix>-<kind>-ubyte`` with ``-`` or ``.`` before ``idx``, gzipped or not."""
    for separator in ("-", "."):
        for suffix in (".gz", ""):
            name = f"{prefix}-{kind.replace('-', separator, 1)}-ubyte{suffix}"
            if (root / name).is_file():
                return root / name
    return None


def read_idx_pair(
    root: Path, split: str, resize: Size | None, need_labels: bool, missing_hint: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (N, H, W, C) and labels of one split of an IDX folder."""
    if not root.is_dir():
        raise ValueError(f"IDX folder {root} does not exist; {missing_hint}")
    if split not in SPLIT_PREFIX:
        raise ValueError(f"IDX data sets have the splits 'train' and 'test', got {split!r}")
    prefix = SPLIT_PREFIX[split]
    images_path = _find(root, prefix, "images-idx3")
    labels_path = _find(root, prefix, "labels-idx1")
    missing = [f"{prefix}-images-idx3-ubyte[.gz]"] if images_path is None else []
    if labels_path is None and need_labels:
        missing.append(f"{prefix}-labels-idx1-ubyte[.gz]")
    if missing:
        raise ValueError(f"{' and '.join(missing)} not found in {root}; {missing_hint}")
    images = read_idx(images_path)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path} must hold uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path, ndim=1).astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{labels_path} has {len(labels)} labels for {len(images)} images")
    if resize is not None:
        images = resize_images(images, resize)
    return images, labels


@register_format("idx")
def read_idx_folder(
    root: Path, split: str, resize: Size | None, cache_dir: Path | None
) -> ImageArray:
    """Any IDX folder with the standard names; without a labels file the data is unlabeled."""
    hint = f"put the standard files ({STANDARD_FILES}) there"
    images, labels = read_idx_pair(root, split, resize, need_labels=False, missing_hint=hint)
    return ImageArray(images, labels)


@register_format("mnist")
def read_mnist(root: Path, split: str, resize: Size | None, cache_dir: Path | None) -> ImageArray:
    """MNIST (digits 0-9) from the four standard IDX files."""
    hint = f"download MNIST's four files ({STANDARD_FILES}) into that folder"
    images, labels = read_idx_pair(root, split, resize, need_labels=True, missing_hint=hint)
    return ImageArray(images, labels, MNIST_CLASSES)


@register_format("fashion-mnist")
def read_fashion_mnist(
    root: Path, split: str, resize: Size | None, cache_dir: Path | None
) -> ImageArray:
    """Fashion-MNIST (10 clothing classes) from the four standard IDX files."""
    hint = (
        f"install them with `apt-get install dataset-fashion-mnist` (puts them in {FASHION_MNIST_ROOT}) "
        f"or put the four files ({STANDARD_FILES}) there"
    )
    images, labels = read_idx_pair(root, split, resize, need_labels=True, missing_hint=hint)
    return ImageArray(images, labels, FASHION_MNIST_CLASSES)


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT, split: str = "train", resize: Size | None = None
) -> ImageArray:
    """Fashion-MNIST's ``split`` ('train': 60,000, 'test': 10,000 grey 28x28 images)."""
    return read_fashion_mnist(Path(root).expanduser().absolute(), split, check_resize(resize), None)
