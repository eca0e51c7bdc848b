"""train.epochs=0 is the post-training-quantization baseline; every quantized run reports the
calibrated student's accuracy before training (summary.json and train.log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sqakd.config import load_config
from sqakd.pipeline import quantize


def _config(root: Path, teacher: Path, output: Path, *extra: str):
    settings = [
        f"data.root={root}", f"data.cache_dir={output.parent / 'cache'}", "data.batch_size=8",
        "data.eval_batch_size=4", "model.name=small_cnn", "model.kwargs={width: 8}",
        f"teacher.checkpoint={teacher}", "run.progress=false", "run.threads=1",
        "run.compile=false", "quant.method=lsq", f"run.output={output}", *extra,
    ]  # fmt: skip
    return load_config(None, settings)


def test_zero_epochs_writes_the_ptq_accuracy(image_tree, teacher_weights, tmp_path):
    config = _config(image_tree, teacher_weights, tmp_path / "ptq", "train.epochs=0")
    result = quantize(config)
    summary = json.loads((tmp_path / "ptq" / "summary.json").read_text())
    assert summary["epochs"] == 0
    assert set(summary["calibrated"]) >= {"top1", "top5"}
    assert summary["last"]["top1"] == summary["calibrated"]["top1"] == result.calibrated["top1"]
    log = (tmp_path / "ptq" / "train.log").read_text()
    assert (
        "calibrated student before training (PTQ, 1 calibration batch(es), observer native)" in log
    )
    assert "inputs normalised with mean (" in log


def test_a_ptq_run_with_an_observer_names_it(image_tree, teacher_weights, tmp_path):
    config = _config(
        image_tree, teacher_weights, tmp_path / "mse", "train.epochs=0", "quant.observer=mse"
    )
    result = quantize(config)
    assert "top1" in result.calibrated
    log = (tmp_path / "mse" / "train.log").read_text()
    assert "(PTQ, 1 calibration batch(es), observer mse): top-1" in log


def test_a_qat_run_reports_its_calibrated_accuracy(image_tree, teacher_weights, tmp_path):
    config = _config(image_tree, teacher_weights, tmp_path / "qat", "train.epochs=1")
    result = quantize(config)
    summary = json.loads((tmp_path / "qat" / "summary.json").read_text())
    assert summary["calibrated"] == result.calibrated and "top1" in result.calibrated
    assert "last" in summary and summary["epochs"] == 1


def test_zero_epochs_without_quantization_is_refused(image_tree, teacher_weights, tmp_path):
    config = _config(
        image_tree, teacher_weights, tmp_path / "t", "train.epochs=0", "method.name=supervised"
    )
    with pytest.raises(ValueError, match="train.epochs=0 calibrates and evaluates a quantized"):
        quantize(config)


def test_prepare_and_calibrate_warnings_go_to_the_run_log(image_tree, teacher_weights, tmp_path):
    """The first layer quantized with an unsigned LSQ grid gets normalised (signed) images:
    calibrate's warning line lands in train.log, and several calibration batches are used."""
    config = _config(
        image_tree, teacher_weights, tmp_path / "neg", "train.epochs=0", "quant.first_last=same",
        "quant.observer=minmax", "train.calibration_batches=2",
    )  # fmt: skip
    quantize(config)
    log = (tmp_path / "neg" / "train.log").read_text()
    assert "WARNING sqakd.calibrate: 1 layer(s) get negative inputs" in log
    assert "(PTQ, 2 calibration batch(es), observer minmax)" in log
