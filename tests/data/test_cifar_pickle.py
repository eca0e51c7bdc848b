import os
import pickle

import numpy as np
import pytest

from sqakd.data import RestrictedUnpickler, load_images, load_pickle

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def fake_rows(n: int, offset: int) -> np.ndarray:
    """Rows of 3072 bytes: channel planes R, G, B of 32x32, row-major, with known values."""
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write(path, obj, protocol=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = {}, {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rows[name] = fake_rows(3, index)
        labels[name] = [(index + k) % 10 for k in range(3)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels[name],
            b"data": rows[name],
            b"filenames": [f"{name}_{k}.png".encode() for k in range(3)],
        }
        write(folder / name, batch)
    write(
        folder / "batches.meta", {b"label_names": [n.encode() for n in CLASSES], b"num_vis": 3072}
    )
    return tmp_path, rows, labels


def test_cifar10_pickles_read_back(cifar10_dir):
    root, rows, labels = cifar10_dir
    train = load_images("cifar10-pickle", root, "train")
    assert train.images.shape == (15, 32, 32, 3)
    assert train.classes == CLASSES
    assert train.labels.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    # pixel (y, x) of channel c is byte c*1024 + y*32 + x of the row
    row = rows["data_batch_2"][1]
    image = train.images[3 + 1]
    for y, x, c in [(0, 0, 0), (0, 1, 0), (5, 7, 1), (31, 31, 2)]:
        assert image[y, x, c] == row[c * 1024 + y * 32 + x]
    test = load_images("cifar10-pickle", root / "cifar-10-batches-py", "test")  # the folder itself
    assert test.images.shape == (3, 32, 32, 3)
    assert test.labels.tolist() == labels["test_batch"]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_fine_labels_any_protocol(tmp_path, protocol):
    folder = tmp_path / "cifar-100-python"
    data = fake_rows(4, 7)
    write(
        folder / "train",
        {"data": data, "fine_labels": [99, 0, 42, 7], "coarse_labels": [1, 2, 3, 4]},
        protocol,
    )
    write(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}, protocol)
    train = load_images("cifar100-pickle", tmp_path, "train")
    assert train.labels.tolist() == [99, 0, 42, 7]
    assert train.num_classes == 100 and train.classes[42] == "c42"
    assert (train.images.transpose(0, 3, 1, 2).reshape(4, -1) == data).all()


def test_resize_of_pickled_images(cifar10_dir):
    root, _, _ = cifar10_dir
    assert load_images("cifar10-pickle", root, "test", resize=(16, 8)).images.shape == (3, 16, 8, 3)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    write(folder / "test_batch", {b"data": Evil(marker), b"labels": []})
    with pytest.raises(
        ValueError, match=r"refusing to load .*test_batch: it asks for (posix|os)\.system"
    ):
        load_images("cifar10-pickle", tmp_path, "test")
    assert not marker.exists()


def test_only_latin1_bytes_decoding_is_allowed(tmp_path):
    path = tmp_path / "p"
    raw = pickle.dumps(
        b"ab", protocol=2
    )  # protocol 2 stores bytes as _codecs.encode(text, "latin1")
    assert b"latin1" in raw
    path.write_bytes(raw)
    assert load_pickle(path) == b"ab"
    path.write_bytes(raw.replace(b"latin1", b"utf_16"))  # same length, other codec
    with pytest.raises(ValueError, match="refusing _codecs.encode"):
        load_pickle(path)


def test_other_globals_are_refused(tmp_path):
    import collections
    import io

    raw = pickle.dumps({"x": collections.OrderedDict(a=1)})
    with pytest.raises(ValueError, match="collections.OrderedDict"):
        RestrictedUnpickler(io.BytesIO(raw)).load()


def test_damaged_pickle(tmp_path):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write(path, {b"data": fake_rows(2, 0), b"labels": [0, 1]})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="damaged"):
        load_images("cifar10-pickle", tmp_path, "test")


def test_missing_files_and_bad_splits(tmp_path, cifar10_dir):
    with pytest.raises(ValueError, match="no cifar-10-batches-py/ folder"):
        load_images("cifar10-pickle", tmp_path / "elsewhere", "train")
    root, _, _ = cifar10_dir
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(ValueError, match="data_batch_4 is missing"):
        load_images("cifar10-pickle", root, "train")
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_images("cifar10-pickle", root, "val")


def test_wrong_contents_are_reported(tmp_path):
    write(tmp_path / "cifar-10-batches-py" / "test_batch", {b"labels": [1]})
    with pytest.raises(ValueError, match="no 'data' entry"):
        load_images("cifar10-pickle", tmp_path, "test")
    write(
        tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": fake_rows(2, 0), b"labels": [1]}
    )
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        load_images("cifar10-pickle", tmp_path, "test")
