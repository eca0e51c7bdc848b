"""train.eval_every: the student is measured every N epochs and always after the last; the run's
last accuracy is the last measurement and its best checkpoint comes only from measured epochs."""

from __future__ import annotations

import csv

from sqakd.config import load_config
from sqakd.pipeline import quantize


def test_the_student_is_measured_every_n_epochs_and_after_the_last(
    image_tree, teacher_weights, tmp_path
):
    settings = [
        f"data.root={image_tree}", "data.batch_size=8", "data.eval_batch_size=4",
        "model.name=small_cnn", "model.kwargs={width: 8}", f"teacher.checkpoint={teacher_weights}",
        "run.progress=false", "run.threads=1", "run.compile=false", "quant.method=lsq",
        "train.epochs=5", "train.eval_every=2", f"run.output={tmp_path / 'run'}",
    ]  # fmt: skip
    result = quantize(load_config(None, settings))
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    measured = [int(row["epoch"]) for row in rows if row.get("test_top1")]
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5]
    assert measured == [2, 4, 5]  # every second epoch, and the last
    assert all(row["train_loss"] for row in rows)  # every epoch still logs its training loss
    assert result.last["top1"] == float(rows[-1]["test_top1"])
    assert result.best_epoch in (2, 4, 5)
