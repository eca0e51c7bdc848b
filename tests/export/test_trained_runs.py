"""ONNX Runtime parity on QAT-trained runs (issue 5), through the command line a user runs.

The synthetic models of ``test_real_models.py`` are not QAT-trained; the deep MobileNetV2 with
EWGS or DoReFa is then so sensitive that float noise alone flips many of its predictions. A real
QAT run is what a user exports, so this test takes run folders made by ``sqakd quantize`` and
checks that ``sqakd export`` + ``sqakd verify --per-layer`` pass at the 99 % threshold on the
run's own test images. Training such runs takes CPU-hours, so they are given from outside::

    SQAKD_TRAINED_RUNS=runs/mnv2/ewgs_w4a4:runs/mnv2/dorefa_w4a4 python -m pytest -m slow \\
        tests/export/test_trained_runs.py

(``benchmarks/RESULTS.md`` gives the commands that made the runs it reports.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sqakd.cli import app

pytestmark = pytest.mark.slow

ISOLATED_MISMATCH_PERCENT = 0.5  # as test_real_models.py: rounding ties only
RUNS = [Path(p) for p in os.environ.get("SQAKD_TRAINED_RUNS", "").split(os.pathsep) if p]


@pytest.mark.skipif(not RUNS, reason="set SQAKD_TRAINED_RUNS to run folders of sqakd quantize")
@pytest.mark.parametrize("run", RUNS, ids=str)
def test_trained_run_exports_and_agrees_with_onnx_runtime(run: Path, tmp_path: Path):
    assert (run / "model.safetensors").is_file(), f"{run} is not a finished run folder"
    runner = CliRunner()
    onnx = tmp_path / "model.onnx"
    exported = runner.invoke(app, ["export", "--run", str(run), "-o", str(onnx)])
    assert exported.exit_code == 0, exported.output
    verified = runner.invoke(app, ["verify", "--run", str(run), "--onnx", str(onnx), "--per-layer"])
    assert verified.exit_code == 0, verified.output
    assert "PASSED: predictions agree" in verified.stdout
    # per layer: "  name  largest-difference  share-of-outputs-beyond-float-noise%"
    layers = [line.split() for line in verified.stdout.splitlines() if line.startswith("  ")]
    assert layers, verified.stdout
    assert max(float(share.rstrip("%")) for *_, share in layers) <= ISOLATED_MISMATCH_PERCENT
