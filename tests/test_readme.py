"""The README's Python code blocks run as written (in a folder holding the teacher.safetensors
they load), and the command line options it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from typer.testing import CliRunner

import sqakd
from sqakd.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_python_blocks_run_as_written(tmp_path, monkeypatch):
    from sqakd.engine import save_weights

    torch.manual_seed(0)
    save_weights(
        sqakd.models.build_model("resnet20", num_classes=10), tmp_path / "teacher.safetensors"
    )
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in python_blocks() if "import sqakd" in b]
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_version_and_the_options_each_command_is_said_to_take():
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sqakd {sqakd.__version__}"
    for command, options in {
        "train": ["--config", "--set", "--output", "--overwrite", "--resume"],
        "quantize": ["--config", "--set", "--output", "--overwrite", "--resume"],
        "eval": ["--run", "--config", "--set", "--weights", "--key-map"],
        "export": ["--run", "--weights", "--key-map", "--output"],
        "verify": ["--run", "--weights", "--key-map", "--threshold", "--per-layer", "--limit"]
        + ["--class-dim"],
    }.items():
        help_text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        for option in options:
            assert option in help_text, (command, option)
