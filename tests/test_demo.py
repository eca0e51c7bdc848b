"""The main job, `sqakd demo`: its students' splits and budgets, and the whole demo end to end on a
few thousand real Fashion-MNIST images (Debian's dataset-fashion-mnist, which .ci/run installs)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sqakd.config import load_config
from sqakd.demo import BATCH_SIZE, Student, demo_base, demo_students, run_demo
from sqakd.pipeline import load_data

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed"
)


def test_every_student_gets_the_same_optimizer_steps():
    students = demo_students(60_000, 0.01)
    assert [(s.method, s.bits, s.images) for s in students] == [
        ("qat", 4, 600), ("qat", 4, 60_000), ("sqakd", 4, 60_000),
        ("qat", 2, 600), ("qat", 2, 60_000), ("sqakd", 2, 60_000),
    ]  # fmt: skip
    assert [s.labels_read for s in students[:3]] == [600, 60_000, 0]
    # 600 labeled images are 4 full batches of 128: 60 epochs of 4 steps; all images: 1 of 240
    assert students[0].schedule(240) == (60, 4)
    assert students[1].schedule(240) == (1, 240)
    assert students[1].schedule(1000) == (3, 334)  # 468 steps per epoch at most
    for student in students:
        epochs, per_epoch = student.schedule(240)
        assert epochs * per_epoch == 240 and per_epoch <= max(student.images // BATCH_SIZE, 1)
    assert len(demo_students(60_000, 1.0)) == 4  # every image labeled: no few-label student
    with pytest.raises(ValueError, match="--labeled-fraction must be in"):
        demo_students(60_000, 0.0)


def test_a_student_measures_once_and_reads_its_labeled_subset(tmp_path):
    student = Student("qat", 2, 600, 60_000)
    settings = student.settings(240, tmp_path / "t.safetensors", tmp_path)
    config = load_config(
        None, settings, base=demo_base(tmp_path, FASHION_MNIST, None, "cpu", False)
    )
    assert (config.train.epochs, config.train.max_steps_per_epoch) == (60, 4)
    assert config.train.eval_every == 60 and config.train.checkpoint_every == 60
    assert config.data.limit_train == 600 and config.data.stratified_limit
    assert config.run.output == tmp_path / "qat_w2a2_600"


def _image_keys(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


@needs_fashion_mnist
@pytest.mark.parametrize("limit", [None, 5000])
def test_the_labeled_split_is_stratified_and_inside_the_unlabeled_images(tmp_path, limit):
    base = demo_base(tmp_path, FASHION_MNIST, limit, "cpu", False)
    everything = load_data(load_config(None, [], base=base).data).train
    few = load_data(load_config(None, ["data.limit_train=600"], base=base).data).train
    assert len(few) == 600 and len(everything) == (limit or 60_000)
    assert Counter(few.labels.tolist()) == {label: 60 for label in range(10)}  # 1 % per class
    assert _image_keys(few.images) <= _image_keys(everything.images)
    again = load_data(load_config(None, ["data.limit_train=600"], base=base).data).train
    assert np.array_equal(again.images, few.images)  # the same subset every run


@pytest.mark.slow  # about 2-3 minutes: decodes Fashion-MNIST and builds the compiled kernels
@needs_fashion_mnist
def test_the_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    rows = run_demo(
        tmp_path / "demo", FASHION_MNIST, teacher_epochs=1, steps=8, labeled_fraction=0.1,
        limit=2560,
    )  # fmt: skip
    assert [(r.result.method, r.result.weight_bits, r.images) for r in rows] == [
        ("supervised", None, 2560),
        ("qat", 4, 256), ("qat", 4, 2560), ("sqakd", 4, 2560),
        ("qat", 2, 256), ("qat", 2, 2560), ("sqakd", 2, 2560),
    ]  # fmt: skip
    assert [r.labels_read for r in rows] == [2560, 256, 2560, 0, 256, 2560, 0]
    assert {r.steps for r in rows[1:]} == {8}
    for row in rows[1:]:  # measured once, after the last step, and every run has its accuracy
        assert 0 < row.result.last["top1"] <= 100
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| SQAKD (no labels) W4A4 | 0 | 2,560 | 8 |" in table
    assert "| QAT (CE, labels) W2A2 | 256 | 256 | 8 |" in table
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
    with pytest.raises(ValueError, match="already holds results; pass --overwrite"):
        run_demo(tmp_path / "demo", FASHION_MNIST, teacher_epochs=1, steps=8, limit=2560)
