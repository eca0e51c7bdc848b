from pathlib import Path

import numpy as np
import pytest

from sqakd.data import (
    ImageArray,
    available_formats,
    default_cache_dir,
    formats,
    load_images,
    register_format,
)


def test_every_reader_is_registered():
    assert available_formats() == [
        "cifar10-pickle", "cifar100-pickle", "fashion-mnist", "folder", "idx", "mnist", "unlabeled",
    ]  # fmt: skip


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown data format 'png-zip'.*folder"):
        load_images("png-zip", "/nowhere")


def test_registering_a_name_twice_is_an_error(monkeypatch):
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    with pytest.raises(ValueError, match="registered twice"):
        register_format("folder")(lambda *args: None)


@pytest.fixture
def recording_format(monkeypatch):
    """A fake format that records the arguments ``load_images`` hands to readers."""
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    calls = []

    @register_format("recording")
    def read(root, split, resize, cache_dir):
        calls.append((root, split, resize, cache_dir))
        return ImageArray(np.zeros((1, 2, 2, 1), dtype=np.uint8))

    return calls


def test_load_images_normalises_arguments(recording_format, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_images("recording", "relative/dir", "val", resize=[8, 6], cache_dir=tmp_path / "c")
    assert recording_format[-1] == (tmp_path / "relative" / "dir", "val", (8, 6), tmp_path / "c")
    load_images("recording", "x", cache=False)
    assert recording_format[-1][3] is None  # no caching at all


def test_default_cache_dir_follows_environment(recording_format, tmp_path, monkeypatch):
    monkeypatch.setenv("SQAKD_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    load_images("recording", "x")
    assert recording_format[-1][3] == tmp_path / "env-cache"
    monkeypatch.delenv("SQAKD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sqakd"


@pytest.mark.parametrize("resize", [(0, 4), (32,), "32", (32, 32, 3), (3.5, 4), 32])
def test_bad_resize_is_rejected(recording_format, resize):
    with pytest.raises(ValueError, match="resize"):
        load_images("recording", "x", resize=resize)


@pytest.mark.parametrize("split", ["", None])
def test_bad_split_is_rejected(recording_format, split):
    with pytest.raises(ValueError, match="split"):
        load_images("recording", "x", split=split)
