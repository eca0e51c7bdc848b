"""Finding image files on disk."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image_file(name: str) -> bool:
    """True for a visible file whose extension (any case) is one of :data:`IMAGE_EXTENSIONS`."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def require_directory(path: Path, what: str = "data folder") -> Path:
    """Return ``path`` if it is a directory, else raise a one-line ``ValueError``."""
    if not path.exists():
        raise ValueError(
            f"{what} {path} does not exist; check data.root (and data.train_split, data.test_split)"
        )
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a folder; point data.root at a folder of images")
    return path


def list_images(directory: Path) -> list[str]:
    """Every image file under ``directory`` at any depth, as sorted absolute paths.

    Hidden files and folders (names starting with ``.``) are skipped.
    """
    found: list[str] = []
    pending = [str(directory)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                elif is_image_file(entry.name) and entry.is_file():
                    found.append(entry.path)
    return sorted(found)


def no_images_error(directory: Path) -> ValueError:
    return ValueError(
        f"no images found under {directory} (looked for {', '.join(IMAGE_EXTENSIONS)} files); "
        "check data.root"
    )


#: folder names that mark a tree as split into parts (root/<split>/...)
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "t10k")


def split_directory(root: Path, split: str) -> Path:
    """``root/split`` when it exists; ``root`` itself when the tree has no split folders.

    A tree with split folders (``train``, ``val``, ``test``...) but none named ``split`` raises a
    ``ValueError`` listing the ones it has.
    """
    require_directory(root)
    candidate = root / split
    if candidate.is_dir():
        return candidate
    splits = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and entry.name.lower() in SPLIT_NAMES
    )
    if splits:
        raise ValueError(
            f"{root} has no {split!r} folder (it has: {', '.join(splits)}); set data.train_split or data.test_split to one of them"
        )
    return root
