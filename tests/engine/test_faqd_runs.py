"""FAQD end to end on the tiny image folders: the pipeline hands it an unfolded teacher whose
stage taps fire, trains its adapters beside the student, and never reads a label."""

from __future__ import annotations

import json

import pytest

from sqakd import pipeline
from sqakd.config import load_config
from sqakd.data import ImageArray


def test_a_label_free_ffa_run_end_to_end(tmp_path, image_tree, teacher_weights, monkeypatch):
    settings = [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=6",
        "model.name=small_cnn", "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}",
        "method.name=faqd", "method.affinity=ffa", "train.epochs=2", "run.progress=false",
        "run.compile=false", f"run.output={tmp_path / 'run'}", "quant.method=lsq",
    ]  # fmt: skip
    original = pipeline.make_loaders

    def guarded(bundle, *args, **kwargs):  # the training split's labels raise when read
        bundle.train = _LabelGuard(bundle.train)
        return original(bundle, *args, **kwargs)

    monkeypatch.setattr(pipeline, "make_loaders", guarded)
    result = pipeline.run(load_config(None, settings))
    assert result.labels_used is False and "top1" in result.last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "faqd"
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "train_ffa" in rows[0] and "train_mse" in rows[0] and len(rows) == 3
    # the guard does catch a reader: the released label weight makes FAQD read labels
    labeled = [*settings[:-2], f"run.output={tmp_path / 'labeled'}", "method.label_weight=0.3"]
    with pytest.raises(AssertionError, match="read a label"):
        pipeline.run(load_config(None, labeled))


class _LabelGuard(ImageArray):
    """The same images; reading ``labels`` raises."""

    def __init__(self, data: ImageArray) -> None:
        object.__setattr__(self, "_data", data)

    def __getattribute__(self, name):
        if name == "labels":
            raise AssertionError("FAQD read a label of the training split")
        if name in ("_data", "__class__"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_data"), name)

    def __len__(self) -> int:
        return len(object.__getattribute__(self, "_data"))


def test_the_released_setting_a_student_of_its_own_architecture(
    tmp_path, image_tree, teacher_weights
):
    """FAQD's released runs distil a larger teacher into a smaller student from random
    initialisation: here a width-8 teacher into a width-4 student (adapters 4 -> 8 channels)."""
    settings = [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=6",
        "model.name=small_cnn", "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}",
        "student.name=small_cnn", "student.kwargs={width: 4}", "method.name=faqd",
        "train.epochs=1", "run.progress=false", "run.compile=false",
        f"run.output={tmp_path / 'run'}", "quant.method=lsq",
    ]  # fmt: skip
    config = load_config(None, settings)
    result = pipeline.run(config)
    assert "top1" in result.last
    weights = tmp_path / "run" / "model.safetensors"
    from safetensors.torch import load_file

    assert load_file(str(weights))["conv1.weight"].shape[0] == 4  # the student's own width
    again = load_config(tmp_path / "run" / "config.yaml")  # eval reads the run folder's config
    assert pipeline.evaluate_model(again, weights)["top1"] == result.last["top1"]
