import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from sqakd.data import FASHION_MNIST_CLASSES, load_fashion_mnist, load_images, read_idx

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Written by hand from the format: 0, 0, type, ndim, big-endian uint32 sizes, values."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray | None, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as handle:
        handle.write(idx_bytes(images))
    if labels is not None:
        with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as handle:
            handle.write(idx_bytes(labels))


@pytest.fixture
def tiny(tmp_path):
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4) * 10
    labels = np.array([7, 0, 3], dtype=np.uint8)
    write_split(tmp_path, "train", images, labels, gz=False)
    write_split(tmp_path, "t10k", images[::-1].copy(), labels[::-1].copy(), gz=True)
    return tmp_path, images, labels


def test_hand_written_idx_header_is_parsed(tmp_path):
    path = tmp_path / "values"
    path.write_bytes(b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes([1, 2, 3, 4, 5, 6]))
    assert read_idx(path).tolist() == [[1, 2, 3], [4, 5, 6]]
    wide = tmp_path / "wide"
    wide.write_bytes(b"\x00\x00\x0b\x01" + struct.pack(">I", 2) + struct.pack(">hh", -2, 300))
    assert read_idx(wide).tolist() == [-2, 300]


def test_raw_and_gzip_splits(tiny):
    root, images, labels = tiny
    train = load_images("idx", root, "train")
    assert train.images.shape == (3, 2, 4, 1)
    assert (train.images[..., 0] == images).all()
    assert train.labels.tolist() == [7, 0, 3] and train.classes is None and train.num_classes == 8
    test = load_images("mnist", root, "test")
    assert (test.images[..., 0] == images[::-1]).all()
    assert test.labels.tolist() == [3, 0, 7]
    assert test.classes == [str(d) for d in range(10)]


def test_idx_without_labels_is_unlabeled(tmp_path):
    write_split(tmp_path, "train", np.zeros((2, 3, 3), dtype=np.uint8), None, gz=True)
    data = load_images("idx", tmp_path)
    assert data.labels is None and len(data) == 2
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        load_images("mnist", tmp_path)


def test_resize(tiny):
    root, _, _ = tiny
    assert load_images("idx", root, resize=(5, 6)).images.shape == (3, 5, 6, 1)


def test_bad_magic_number(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x12\x34\x08\x01" + bytes(10))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_wrong_dimension_count(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    with pytest.raises(ValueError, match="2-d IDX array, expected 1-d"):
        read_idx(path, ndim=1)


def test_truncated_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((4, 2, 2), dtype=np.uint8))[:-3])
    with pytest.raises(ValueError, match="damaged"):
        read_idx(path)


def test_label_count_must_match(tmp_path):
    write_split(tmp_path, "train", np.zeros((3, 2, 2), np.uint8), np.zeros(2, np.uint8), gz=False)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        load_images("idx", tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_images("fashion-mnist", tmp_path / "absent")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz, train-labels"):
        load_images("mnist", tmp_path)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_images("idx", tmp_path, "val")


@pytest.mark.skipif(
    not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist():
    train = load_fashion_mnist()
    assert train.images.shape == (60_000, 28, 28, 1)
    assert train.classes == FASHION_MNIST_CLASSES
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published order
    test = load_images("fashion-mnist", FASHION_ROOT, "test")
    assert test.images.shape == (10_000, 28, 28, 1)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]
