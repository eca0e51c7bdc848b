import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sqakd.data import load_images

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def load(root, split="train", **options):
    return load_images("folder", root, split, cache=False, **options)


def test_classes_are_sorted_folder_names_and_pixels_survive(tmp_path, write_image):
    write_image(tmp_path / "train" / "zebra" / "1.png", (200, 0, 10))
    write_image(tmp_path / "train" / "ant" / "b.png", (1, 2, 3))
    write_image(tmp_path / "train" / "ant" / "a.bmp", (4, 5, 6))
    write_image(tmp_path / "train" / "ant" / "deeper" / "c.webp", (7, 8, 9))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    data = load(tmp_path)
    assert data.classes == ["ant", "zebra"]
    assert data.labels.tolist() == [0, 0, 0, 1]
    assert data.images.shape == (4, 4, 5, 3)
    # sorted paths inside a class: a.bmp, b.png, deeper/c.webp
    assert data.images[:, 0, 0].tolist() == [[4, 5, 6], [1, 2, 3], [7, 8, 9], [200, 0, 10]]
    assert (data.images == data.images[:, :1, :1]).all()  # constant images stay constant


def test_class_folders_directly_under_root(tmp_path, write_image):
    write_image(tmp_path / "cats" / "x.png", (9, 9, 9))
    write_image(tmp_path / "dogs" / "y.png", (1, 1, 1))
    data = load(tmp_path, "test")  # no split folders: the root holds the classes
    assert data.classes == ["cats", "dogs"] and len(data) == 2


def test_all_grey_folder_stays_one_channel(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", 17, mode="L")
    write_image(tmp_path / "b" / "2.png", 250, mode="L")
    data = load(tmp_path)
    assert data.images.shape == (2, 4, 5, 1)
    assert data.images[:, 0, 0, 0].tolist() == [17, 250]


def test_mixed_grey_and_colour_becomes_rgb(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", 17, mode="L")
    write_image(tmp_path / "b" / "2.png", (1, 2, 3))
    data = load(tmp_path)
    assert data.images.shape == (2, 4, 5, 3)
    assert data.images[0, 0, 0].tolist() == [17, 17, 17]
    assert data.images[1, 0, 0].tolist() == [1, 2, 3]


def test_resize_makes_mixed_sizes_one_shape(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", (10, 20, 30), size=(8, 8))
    write_image(tmp_path / "a" / "2.png", (40, 50, 60), size=(3, 7))
    data = load(tmp_path, resize=(6, 4))
    assert data.images.shape == (2, 6, 4, 3)
    assert data.images[1, 5, 3].tolist() == [40, 50, 60]  # a constant image resizes to itself


def test_mixed_sizes_without_resize_names_two_files(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", 0, size=(8, 8))
    write_image(tmp_path / "a" / "2.png", 0, size=(3, 7))
    with pytest.raises(ValueError, match=r"1\.png is 8x8 but .*2\.png is 3x7.*set data\.resize"):
        load(tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "absent")


def test_root_without_class_folders(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        load(tmp_path)


def test_empty_class_folder_is_named(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", 0)
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'b'} has no images"):
        load(tmp_path)


def test_corrupt_image_is_named(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", 0)
    (tmp_path / "a" / "2.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode image .*2\.jpg"):
        load(tmp_path)


def test_missing_split_lists_the_existing_ones(tmp_path, write_image):
    write_image(tmp_path / "train" / "a" / "1.png", 0)
    write_image(tmp_path / "test" / "a" / "1.png", 0)
    with pytest.raises(ValueError, match="no 'val' folder.*test, train"):
        load(tmp_path, "val")


def test_errors_are_one_line(tmp_path, write_image):
    write_image(tmp_path / "a" / "1.png", 0, size=(8, 8))
    write_image(tmp_path / "a" / "2.png", 0, size=(3, 7))
    for root in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ValueError) as error:
            load(root)
        assert "\n" not in str(error.value)


@pytest.mark.slow  # extracting 60,000 files can take a while on a busy disk
def test_real_cifar10_test_split(cifar10_root):
    data = load(cifar10_root, "test")
    assert data.images.shape == (10_000, 32, 32, 3)
    assert data.classes == CIFAR10_CLASSES
    assert np.bincount(data.labels).tolist() == [1000] * 10
    assert (np.diff(data.labels) >= 0).all()  # class by class, in label order
    # image k is the k-th file in sorted order within its class
    for label, name in [(0, "airplane"), (9, "truck")]:
        first = sorted(os.listdir(cifar10_root / "test" / name))[0]
        expected = np.asarray(Image.open(cifar10_root / "test" / name / first).convert("RGB"))
        assert (data.images[label * 1000] == expected).all()


@pytest.mark.slow
def test_real_cifar10_train_split(cifar10_root):
    data = load(Path(cifar10_root), "train")
    assert data.images.shape == (50_000, 32, 32, 3)
    assert data.classes == CIFAR10_CLASSES
    assert np.bincount(data.labels).tolist() == [5000] * 10
