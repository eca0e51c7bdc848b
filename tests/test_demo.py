"""The main job, `sqakd demo`, end to end on a few hundred real Fashion-MNIST images (Debian's
dataset-fashion-mnist, which .ci/run installs): a teacher, label-free SQAKD and labeled QAT at
W4A4 and W2A2, a results table and a plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from sqakd.demo import run_demo

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow  # about 1-2 minutes: decodes Fashion-MNIST and builds the compiled kernels
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_the_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    results = run_demo(tmp_path / "demo", FASHION_MNIST, teacher_epochs=1, epochs=1, limit=512)
    assert [(r.method, r.weight_bits) for r in results] == [
        ("supervised", None), ("sqakd", 4), ("qat", 4), ("sqakd", 2), ("qat", 2),
    ]  # fmt: skip
    assert [r.labels_used for r in results] == [True, False, True, False, True]
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| SQAKD (no labels) W4A4 | no |" in table and "| QAT (CE, labels) W2A2 | yes |" in table
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
    with pytest.raises(ValueError, match="already holds results; pass --overwrite"):
        run_demo(tmp_path / "demo", FASHION_MNIST, teacher_epochs=1, epochs=1, limit=512)
