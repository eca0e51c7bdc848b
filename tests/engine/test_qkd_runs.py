"""QKD end to end on the tiny data: the real command line (phases logged and in metrics.csv, the
co-studied teacher saved and evaluated before and after), a label-free run whose training labels
raise if anything reads them, and a labeled QKD on unlabeled training images refused."""

from __future__ import annotations

import json

import pytest
from engine_runs import quantize_args, read_rows, run_python
from safetensors.torch import load_file

from sqakd import data as datasets
from sqakd import pipeline
from sqakd.config import load_config

PHASES = ["self_studying", "co_studying", "tutoring"]


def test_qkd_through_the_command_line_writes_the_teacher_and_the_phases(
    tmp_path, image_tree, teacher_weights
):
    output = tmp_path / "qkd"
    args = quantize_args(image_tree, teacher_weights, output, "method.name=qkd",
                         "train.epochs=3", "method.self_study_epochs=1",
                         "method.co_study_epochs=1")  # fmt: skip
    done = run_python(["-m", "sqakd", *args])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["phase"] for row in read_rows(output)] == PHASES
    log = (output / "train.log").read_text()
    for phase in PHASES:
        assert f"phase {phase}" in log
    summary = json.loads((output / "summary.json").read_text())
    assert summary["labels_used"] is True and summary["method"] == "qkd"
    assert "top1" in summary["teacher"] and "top1" in summary["teacher_after"]
    trained = load_file(str(output / "teacher.safetensors"))
    original = load_file(str(teacher_weights))
    assert trained.keys() == original.keys()
    assert any(not trained[k].equal(original[k]) for k in original)  # co-studying trained it


class ForbiddenLabels:
    """Stands in for a training split's labels: reading them in any way fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a training label was read ({name})")

    def __getitem__(self, index):
        raise AssertionError("a training label was read")

    def __array__(self, *args, **kwargs):
        raise AssertionError("a training label was read")

    def __len__(self):
        raise AssertionError("a training label was read")


def tiny_settings(image_tree, teacher_weights, output, *extra):
    return [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=4",
        "model.name=small_cnn", "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}",
        "method.name=qkd", "train.epochs=3", "method.self_study_epochs=1",
        "method.co_study_epochs=1", "run.progress=false", f"run.output={output}",
        "run.compile=false", "quant.first_last=float", *extra,
    ]  # fmt: skip


def test_label_free_qkd_never_reads_a_training_label(
    tmp_path, image_tree, teacher_weights, monkeypatch
):
    real_load = datasets.load_images

    def guarded(format, root, split, **options):
        images = real_load(format, root, split=split, **options)
        if split == "train":
            images.labels = ForbiddenLabels()  # `labels is None` is the only check allowed
        return images

    monkeypatch.setattr(datasets, "load_images", guarded)
    output = tmp_path / "label_free"
    result = pipeline.run(
        load_config(None, tiny_settings(image_tree, teacher_weights, output, "method.labels=false"))
    )
    assert result.labels_used is False
    assert "top1" in result.teacher and "top1" in result.teacher_after
    assert [row["phase"] for row in read_rows(output)] == PHASES
    assert "no labels read" in (output / "train.log").read_text()
    assert (output / "teacher.safetensors").is_file()


def test_labeled_qkd_on_unlabeled_training_images_is_refused(tmp_path, image_tree, teacher_weights):
    settings = tiny_settings(image_tree, teacher_weights, tmp_path / "refused",
                             "data.format=unlabeled", "data.test_format=folder")  # fmt: skip
    with pytest.raises(
        ValueError, match="training images have none.*set method.labels=false"
    ) as error:
        pipeline.run(load_config(None, settings))
    assert "\n" not in str(error.value)
