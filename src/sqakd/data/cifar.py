"""The CIFAR-10 / CIFAR-100 "python version" pickles, read without running code from the file.

CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; each batch is a
dict with ``data`` (N x 3072 uint8, channel planes R, G, B of 32 x 32 row-major) and ``labels``.
CIFAR-100: ``cifar-100-python/{train, test, meta}`` with ``fine_labels`` (the 100-class labels).

Pickle can call any importable function, so an untrusted file could run code. The files are read
with :class:`RestrictedUnpickler`, which resolves only the few numpy names needed to rebuild an
array and refuses every other global with a ``ValueError``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import ImageArray
from .decode import resize_images
from .formats import Size, register_format

try:  # numpy >= 2 keeps these in numpy._core; older pickles name numpy.core
    from numpy._core import multiarray, numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray, numeric


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes, limited to latin-1."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591", "l1"):
        raise ValueError(f"refusing _codecs.encode with encoding {encoding!r} in a data pickle")
    return text.encode("latin1")


#: the only globals a pickle of plain data and numpy arrays needs (protocols 2 to 5)
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = multiarray._reconstruct
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "scalar")] = multiarray.scalar
    if hasattr(numeric, "_frombuffer"):
        ALLOWED_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = numeric._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, bytes, numbers) and numpy arrays, nothing else."""

    def __init__(self, file: io.BufferedIOBase, source: str = "pickle") -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ValueError(
                f"refusing to load {self.source}: it asks for {module}.{name}, which a data "
                "pickle never needs (the file may be malicious); only numpy arrays are allowed"
            ) from None


def load_pickle(path: Path) -> Any:
    """Read one pickle file with :class:`RestrictedUnpickler`."""
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, str(path)).load()
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"cannot read pickle {path} ({error}); the file is damaged") from None


def _batch(path: Path) -> dict[str, Any]:
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} is not a CIFAR batch (expected a dict, got {type(data).__name__})"
        )
    return {
        key.decode("latin1") if isinstance(key, bytes) else key: value
        for key, value in data.items()
    }


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(
            f"{path} is not a CIFAR batch: it has no {key!r} entry (has {sorted(batch)})"
        )
    return batch[key]


def _names(values: list[Any]) -> list[str]:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in values]


def _read_cifar(
    folder: Path,
    files: list[str],
    label_key: str,
    meta_file: str,
    names_key: str,
    resize: Size | None,
) -> ImageArray:
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(
                f"CIFAR file {path} is missing; extract the official python-version archive so "
                f"that {folder.name}/ holds {', '.join(files)}"
            )
        batch = _batch(path)
        data = np.asarray(_field(batch, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
            )
        batch_labels = np.asarray(_field(batch, label_key, path), dtype=np.int64)
        if batch_labels.shape != (len(data),):
            raise ValueError(f"{path}: {len(batch_labels)} labels for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    meta_path = folder / meta_file
    classes = (
        _names(_field(_batch(meta_path), names_key, meta_path)) if meta_path.is_file() else None
    )
    array = np.ascontiguousarray(np.concatenate(images))
    if resize is not None:
        array = resize_images(array, resize)
    return ImageArray(array, np.concatenate(labels), classes)


def _folder(root: Path, name: str) -> Path:
    """``root/name`` if it exists, or ``root`` itself when it is that folder."""
    if root.name == name and root.is_dir():
        return root
    if (root / name).is_dir():
        return root / name
    raise ValueError(
        f"no {name}/ folder at {root}; set data.root to the folder that contains {name}/"
    )


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR has the splits 'train' and 'test', got {split!r}")
    return split


@register_format("cifar10-pickle")
def read_cifar10(root: Path, split: str, resize: Size | None, cache_dir: Path | None) -> ImageArray:
    """CIFAR-10: 50,000 train / 10,000 test images, 10 classes (names from ``batches.meta``)."""
    files = (
        [f"data_batch_{i}" for i in range(1, 6)]
        if _check_split(split) == "train"
        else ["test_batch"]
    )
    folder = _folder(root, "cifar-10-batches-py")
    return _read_cifar(folder, files, "labels", "batches.meta", "label_names", resize)


@register_format("cifar100-pickle")
def read_cifar100(
    root: Path, split: str, resize: Size | None, cache_dir: Path | None
) -> ImageArray:
    """CIFAR-100 with its 100 fine labels (names from ``meta``)."""
    folder = _folder(root, "cifar-100-python")
    return _read_cifar(
        folder, [_check_split(split)], "fine_labels", "meta", "fine_label_names", resize
    )
