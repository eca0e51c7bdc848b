"""metrics.csv stays a table when later epochs log other columns (a phase with other losses)."""

from __future__ import annotations

import csv

from sqakd.engine import RunLog, read_metrics


def test_a_new_column_rewrites_the_file_with_every_column(tmp_path):
    log = RunLog(tmp_path)
    log.metrics({"epoch": 1, "phase": "alone", "train_ce": 0.5}, step=1)
    log.metrics({"epoch": 2, "phase": "together", "train_ce": 0.4, "train_kl": 0.3}, step=2)
    log.metrics({"epoch": 3, "phase": "together", "train_kl": 0.2}, step=3)
    log.close()
    with (tmp_path / "metrics.csv").open(newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["epoch", "phase", "train_ce", "train_kl"]
    assert rows[1:] == [["1", "alone", "0.5", ""], ["2", "together", "0.4", "0.3"],
                        ["3", "together", "", "0.2"]]  # fmt: skip
    assert read_metrics(tmp_path)[2]["train_kl"] == "0.2"


def test_rewriting_from_a_history_keeps_every_column(tmp_path):
    log = RunLog(tmp_path)
    log.rewrite_metrics([{"epoch": 1, "a": 1.0}, {"epoch": 2, "b": 2.0}])
    log.close()
    assert read_metrics(tmp_path) == [{"epoch": "1", "a": "1.0", "b": ""},
                                      {"epoch": "2", "a": "", "b": "2.0"}]  # fmt: skip
