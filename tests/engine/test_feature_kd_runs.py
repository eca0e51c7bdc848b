"""`feature_kd` through the whole pipeline on the tiny image folders: the registered stage names
become taps, a loss's own modules train in the `adapters` group, CRD reads sample indices and
labels, and FSP's pre-stage runs as its own phase."""

from __future__ import annotations

import csv

import pytest

from sqakd.config import load_config
from sqakd.engine import safe_torch_load
from sqakd.pipeline import quantize


def _settings(image_tree, teacher_weights, output, *extra):
    return [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=4",
        "model.name=small_cnn", "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}",
        "run.progress=false", "run.threads=1", "run.compile=false", "quant.method=lsq",
        "method.name=feature_kd", "train.epochs=2", f"run.output={output}", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("loss", "extra", "column"),
    [
        ("crd", ["method.loss_options={crd: {negatives: 16}}"], "train_crd"),
        ("fsp", ["method.loss_options={fsp: {pre_epochs: 1}}"], "train_fsp"),
        ("at", ["method.labels=false"], "train_at"),
    ],
)
def test_a_feature_kd_run_end_to_end(image_tree, teacher_weights, tmp_path, loss, extra, column):
    output = tmp_path / loss
    settings = _settings(image_tree, teacher_weights, output, f"method.loss={loss}", *extra)
    result = quantize(load_config(None, settings))
    assert "top1" in result.last and result.labels_used is ("method.labels=false" not in extra)
    with open(output / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and rows[0][column] != ""
    state = safe_torch_load(output / "checkpoints" / "last.pt")
    if loss == "fsp":  # the pre-stage, then CE alone: the FSP term is logged only in phase pre
        assert [row["phase"] for row in rows] == ["pre", "train"] and rows[1][column] == ""
    if loss == "crd":  # embeddings and memory banks: own modules in the adapters group
        assert "adapters" in state["optimizers"]
