import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from sqakd.data import cache as cache_module
from sqakd.data import decode_images, list_images, load_images


@pytest.fixture
def tree(tmp_path, write_image):
    root = tmp_path / "images"
    for label, name in enumerate(["a", "b"]):
        for k in range(3):
            write_image(root / "train" / name / f"{k}.png", (label * 100 + k, k, 7))
    return root


def fail_if_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the images")


def test_second_load_hits_the_cache(tree, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = load_images("folder", tree, cache_dir=cache_dir)
    files = list(cache_dir.iterdir())
    assert (
        len(files) == 1 and files[0].suffix == ".npz" and files[0].name.startswith("images-train-")
    )
    monkeypatch.setattr(cache_module, "decode_images", fail_if_decoding)
    second = load_images("folder", tree, cache_dir=cache_dir)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels) and first.classes == second.classes
    with zipfile.ZipFile(files[0]) as archive:  # plain .npy inside: loads with allow_pickle=False
        assert archive.namelist() == ["images.npy"]


def test_cached_array_equals_a_fresh_decode(tree, tmp_path):
    cached = load_images("folder", tree, cache_dir=tmp_path / "cache")
    again = load_images("folder", tree, cache_dir=tmp_path / "cache")
    fresh = load_images("folder", tree, cache=False)
    assert np.array_equal(again.images, fresh.images) and np.array_equal(
        cached.images, fresh.images
    )
    assert fresh.images[:, 0, 0, 0].tolist() == [0, 1, 2, 100, 101, 102]


def test_key_changes_with_files_resize_and_split(tree, tmp_path, write_image):
    paths = list_images(tree / "train")
    key = cache_module.cache_key(tree, "train", None, paths)
    assert key == cache_module.cache_key(tree, "train", None, list(paths))
    assert key != cache_module.cache_key(tree, "test", None, paths)
    assert key != cache_module.cache_key(tree, "train", (8, 8), paths)
    assert key != cache_module.cache_key(tree, "train", None, paths[:-1])
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key != cache_module.cache_key(tree, "train", None, paths)


def test_changed_file_is_decoded_again(tree, tmp_path, write_image):
    cache_dir = tmp_path / "cache"
    load_images("folder", tree, cache_dir=cache_dir)
    path = tree / "train" / "a" / "0.png"
    write_image(path, (250, 250, 250))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # mtime surely differs
    updated = load_images("folder", tree, cache_dir=cache_dir)
    assert updated.images[0, 0, 0].tolist() == [250, 250, 250]
    assert len(list(cache_dir.iterdir())) == 2


def test_no_cache_writes_nothing(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("SQAKD_CACHE", str(tmp_path / "env-cache"))
    load_images("folder", tree, cache=False)
    assert not (tmp_path / "env-cache").exists()
    load_images("folder", tree)  # default cache dir comes from the environment
    assert len(list((tmp_path / "env-cache").iterdir())) == 1


def test_damaged_cache_file_is_rebuilt(tree, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    good = load_images("folder", tree, cache_dir=cache_dir)
    (cached,) = cache_dir.iterdir()
    cached.write_bytes(b"garbage")
    rebuilt = load_images("folder", tree, cache_dir=cache_dir)
    assert np.array_equal(good.images, rebuilt.images)
    assert "unreadable cache file" in caplog.text
    assert np.array_equal(np.load(cached, allow_pickle=False)["images"], good.images)
    assert [p.name for p in cache_dir.iterdir()] == [cached.name]  # no temporary files left


def test_unwritable_cache_dir_still_loads(tree, tmp_path, caplog):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    data = load_images("folder", tree, cache_dir=blocker / "cache")
    assert len(data) == 6 and "continuing without it" in caplog.text


def test_process_pool_decode_equals_serial_decode(cifar10_subset):
    paths = list_images(cifar10_subset)
    assert len(paths) > 1000  # above the serial limit, so the process pool runs
    pooled = decode_images(paths, workers=2)
    serial = decode_images(paths, workers=1)
    assert pooled.shape == (len(paths), 32, 32, 3)
    assert np.array_equal(pooled, serial)


def test_pool_reports_the_bad_file(cifar10_subset, tmp_path):
    paths = list_images(cifar10_subset)
    bad = tmp_path / "zz-broken.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(ValueError, match="zz-broken.jpg"):
        decode_images(paths[:700] + [str(bad)] + paths[700:], workers=2)


@pytest.fixture(scope="module")
def cifar10_subset(tmp_path_factory):
    """1,200 files in a flat folder: real JPEGs when a CIFAR-10 copy is given, else PNGs."""
    folder = tmp_path_factory.mktemp("subset")
    source = os.environ.get("SQAKD_CIFAR10_ROOT")
    if source and os.path.isdir(os.path.join(source, "test", "cat")):
        for name in sorted(os.listdir(os.path.join(source, "test", "cat")))[:600]:
            for cls in ("cat", "dog"):
                shutil.copy(os.path.join(source, "test", cls, name), folder / f"{cls}-{name}")
    else:
        for k in range(1200):
            pixels = np.full((32, 32, 3), (k % 256, k // 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{k:04d}.png")
    return folder


@pytest.mark.slow
def test_real_cifar10_cache_round_trip(cifar10_root, tmp_path, monkeypatch):
    cached = load_images("folder", cifar10_root, "test", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(cache_module, "decode_images", fail_if_decoding)
    hit = load_images("folder", cifar10_root, "test", cache_dir=tmp_path / "cache")
    assert np.array_equal(cached.images, hit.images)
    monkeypatch.undo()
    fresh = load_images("folder", cifar10_root, "test", cache=False)
    assert np.array_equal(hit.images, fresh.images) and np.array_equal(hit.labels, fresh.labels)


def test_decoding_falls_back_to_one_process(cifar10_subset, monkeypatch, caplog):
    from sqakd.data import decode

    def no_pool(*args, **kwargs):
        raise OSError("no semaphores here")

    paths = list_images(cifar10_subset)
    monkeypatch.setattr(decode, "ProcessPoolExecutor", no_pool)
    assert np.array_equal(decode_images(paths, workers=2), decode_images(paths, workers=1))
    assert "decoding in this process" in caplog.text
    monkeypatch.setenv("SQAKD_DECODE_WORKERS", "1")
    assert decode.default_workers() == 1
    monkeypatch.setenv("SQAKD_DECODE_WORKERS", "many")
    with pytest.raises(ValueError, match="SQAKD_DECODE_WORKERS"):
        decode.default_workers()
