"""Shared fixtures: real data sets extracted once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: the project's real test data lives beside the repository (see shared/data/README.md)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_TARBALL = SHARED_DATA / "cifar10-jpeg.tar.gz"


def _extract(tarball: Path, destination: Path) -> None:
    """GNU tar is ~5x faster than tarfile on 60,000 small files; tarfile is the fallback."""
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(destination)], check=True)
        return
    with tarfile.open(tarball) as archive:
        archive.extractall(destination, filter="data")


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """CIFAR-10 as JPEG class folders (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).

    Reuses the extracted copy at ``$SQAKD_CIFAR10_ROOT`` when set; otherwise extracts
    shared/data/cifar10-jpeg.tar.gz once per session into a temporary folder (removed afterwards).
    Skips when neither is available.
    """
    given = os.environ.get("SQAKD_CIFAR10_ROOT")
    if given:
        root = Path(given)
        if not ((root / "train").is_dir() and (root / "test").is_dir()):
            pytest.fail(f"SQAKD_CIFAR10_ROOT={given} has no train/ and test/ folders")
        yield root
        return
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 copy not found at {CIFAR10_TARBALL}")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    _extract(CIFAR10_TARBALL, root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fit_until():
    """``fit_until(trainer, step)``: ``trainer.fit()`` interrupted (``KeyboardInterrupt``, as a
    Ctrl-C would) just before step ``step`` starts; what the checkpoints hold is then the test's."""

    def run(trainer, step: int) -> None:
        original = trainer.train_step

        def train_step(batch):
            if trainer.step == step:
                raise KeyboardInterrupt
            return original(batch)

        trainer.train_step = train_step
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()

    return run


@pytest.fixture(autouse=True)
def sqakd_logger_propagates():
    """A command's console logging stops the ``sqakd`` logger propagating; each test starts with
    it propagating again so that ``caplog`` sees its records whatever ran before."""
    import logging

    logger = logging.getLogger("sqakd")
    logger.propagate = True
    yield
    logger.propagate = True
