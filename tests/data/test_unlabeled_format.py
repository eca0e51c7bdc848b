import pytest

from sqakd.data import load_images


def load(root, split="train", **options):
    return load_images("unlabeled", root, split, cache=False, **options)


def test_nested_images_in_sorted_path_order(tmp_path, write_image):
    write_image(tmp_path / "b" / "deep" / "deeper" / "x.png", (3, 3, 3))
    write_image(tmp_path / "a.png", (1, 1, 1))
    write_image(tmp_path / "b" / "c.jpeg", (128, 128, 128))
    write_image(tmp_path / "b" / "A.PNG", (2, 2, 2))  # upper-case extensions count
    write_image(tmp_path / ".hidden" / "skip.png", (99, 99, 99))
    write_image(tmp_path / ".skip.png", (99, 99, 99))
    (tmp_path / "readme.txt").write_text("not an image")
    data = load(tmp_path)
    assert data.labels is None and data.classes is None and data.num_classes is None
    assert data.images.shape == (4, 4, 5, 3)
    # sorted paths: a.png, b/A.PNG, b/c.jpeg, b/deep/deeper/x.png
    firsts = data.images[:, 0, 0, 0].tolist()
    assert firsts[:2] == [1, 2] and abs(firsts[2] - 128) <= 2 and firsts[3] == 3


def test_split_folder_is_used_when_present(tmp_path, write_image):
    write_image(tmp_path / "train" / "x" / "1.png", (5, 5, 5))
    write_image(tmp_path / "test" / "2.png", (6, 6, 6))
    assert load(tmp_path, "test").images[:, 0, 0, 0].tolist() == [6]
    assert load(tmp_path, "train").images[:, 0, 0, 0].tolist() == [5]


def test_empty_tree_is_an_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found under"):
        load(tmp_path)


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope")


def test_file_as_root_is_an_error(tmp_path, write_image):
    path = write_image(tmp_path / "a.png", 0)
    with pytest.raises(ValueError, match="not a folder"):
        load(path)
