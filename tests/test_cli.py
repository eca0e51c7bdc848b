"""End to end through the command line on a tiny tree of real CIFAR-10 JPEGs, and every bad input
a user can make, each answered by one clear line (exit code 2, no traceback)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sqakd.cli import app

CIFAR10_TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 16, "test": 6}

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/ (16 per class) and test/<class>/ (6 per class) of real CIFAR-10 JPEG files."""
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"{CIFAR10_TARBALL} is missing")
    root = tmp_path_factory.mktemp("tiny_cifar")
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR10_TARBALL) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in PER_CLASS:
                continue
            key = (parts[-3], parts[-2])
            if counts.get(key, 0) >= PER_CLASS[parts[-3]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            target = root / parts[-3] / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            if len(counts) == 20 and all(counts[k] >= PER_CLASS[k[0]] for k in counts):
                break
    return root


def common(tree: Path, tmp_path: Path) -> list[str]:
    return [
        "-s", f"data.root={tree}", "-s", "model.name=resnet20", "-s", "data.batch_size=32",
        "-s", f"data.cache_dir={tmp_path / 'cache'}", "-s", "run.progress=false", "-s", "train.epochs=1",
    ]  # fmt: skip


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def teacher_run(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    result = invoke("train", *common(tiny_tree, tmp), "-o", str(tmp / "teacher"))
    assert result.exit_code == 0, result.output
    return tmp / "teacher"


def test_train_writes_a_complete_run_folder(teacher_run: Path):
    for name in (
        "config.yaml",
        "train.log",
        "metrics.csv",
        "curves.png",
        "summary.json",
        "model.safetensors",
    ):
        assert (teacher_run / name).is_file(), name
    assert (teacher_run / "checkpoints" / "last.pt").is_file()
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert summary["method"] == "supervised" and summary["labels_used"] is True
    assert 0 <= summary["last"]["top1"] <= 100


def test_label_free_quantize_and_eval(tiny_tree: Path, teacher_run: Path, tmp_path: Path):
    output = tmp_path / "w4a4"
    result = invoke(
        "quantize", *common(tiny_tree, tmp_path), "-s", f"teacher.checkpoint={teacher_run / 'model.safetensors'}",
        "-s", "quant.method=lsq", "-o", str(output),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "summary.json").read_text())
    assert summary["labels_used"] is False and summary["weight_bits"] == 4
    assert summary["teacher"]["top1"] == pytest.approx(
        json.loads((teacher_run / "summary.json").read_text())["last"]["top1"]
    )
    assert "QuantConv2d" in (output / "train.log").read_text()
    evaluated = invoke("eval", "--run", str(output))
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout[evaluated.stdout.index("{") :])["top1"] == pytest.approx(
        summary["last"]["top1"]
    )


def test_unlabeled_folder_trains_without_labels(tiny_tree: Path, teacher_run: Path, tmp_path: Path):
    unlabeled = tmp_path / "photos" / "nested" / "deeper"
    unlabeled.mkdir(parents=True)
    for index, path in enumerate(sorted((tiny_tree / "train").rglob("*.jpg"))[:64]):
        (unlabeled / f"{index:03d}.jpg").write_bytes(path.read_bytes())
    result = invoke(
        "quantize", *common(tiny_tree, tmp_path), "-s", f"teacher.checkpoint={teacher_run / 'model.safetensors'}",
        "-s", "data.format=unlabeled", "-s", f"data.root={tmp_path / 'photos'}", "-s", "data.test_format=folder",
        "-s", f"data.test_root={tiny_tree}", "-s", f"data.mean={[0.5, 0.5, 0.5]}", "-s", f"data.std={[0.25, 0.25, 0.25]}",
        "-o", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["labels_used"] is False


def error_of(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [
        line for line in result.stderr.splitlines() if line.strip()
    ]  # progress logs go to stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_existing_run_is_not_overwritten(tiny_tree: Path, teacher_run: Path, tmp_path: Path):
    before = (teacher_run / "model.safetensors").read_bytes()
    line = error_of(invoke("train", *common(tiny_tree, tmp_path), "-o", str(teacher_run)))
    assert "already holds a run" in line and "--overwrite" in line
    assert (teacher_run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["-s", "data.bacth_size=3"], "did you mean 'batch_size'"),
        (["-s", "quant.weight_bits=9"], "quant.weight_bits"),
        (["-s", "model.name=resnet7"], "resnet20"),
        (["-s", "method.name=magic"], "sqakd"),
        (["-s", "quant.method=magic"], "ewgs"),
    ],
)
def test_bad_settings_are_one_line(
    tiny_tree: Path, teacher_run: Path, tmp_path: Path, overrides, expected
):
    args = [
        *common(tiny_tree, tmp_path),
        "-s",
        f"teacher.checkpoint={teacher_run / 'model.safetensors'}",
    ]
    line = error_of(invoke("quantize", *args, *overrides, "-o", str(tmp_path / "x")))
    assert expected in line


def test_missing_and_empty_data_folders(tmp_path: Path):
    line = error_of(
        invoke("train", *common(tmp_path / "nowhere", tmp_path), "-o", str(tmp_path / "a"))
    )
    assert "nowhere" in line
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "cat").mkdir(parents=True)
    line = error_of(
        invoke("train", *common(tmp_path / "empty", tmp_path), "-o", str(tmp_path / "b"))
    )
    assert "image" in line.lower()


def test_unreadable_and_mixed_size_images(tiny_tree: Path, tmp_path: Path):
    from PIL import Image

    broken = tmp_path / "broken"
    for split in ("train", "test"):
        (broken / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(broken / split / "a" / "ok.png")
    (broken / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    assert "bad.jpg" in error_of(
        invoke("train", *common(broken, tmp_path), "-o", str(tmp_path / "c"))
    )
    (broken / "train" / "a" / "bad.jpg").unlink()
    Image.new("RGB", (40, 24)).save(broken / "train" / "a" / "big.png")
    assert "resize" in error_of(
        invoke("train", *common(broken, tmp_path), "-o", str(tmp_path / "d"))
    )


def test_teacher_class_count_mismatch(tiny_tree: Path, tmp_path: Path):
    from sqakd.models import build_model

    wrong = tmp_path / "teacher100.pt"
    torch.save(build_model("resnet20", num_classes=100).state_dict(), wrong)
    line = error_of(invoke("quantize", *common(tiny_tree, tmp_path), "-s", f"teacher.checkpoint={wrong}",
                           "-o", str(tmp_path / "e")))  # fmt: skip
    assert "class" in line and "mismatch" in line


def test_methods_lists_registries():
    result = invoke("methods")
    assert result.exit_code == 0
    for name in ("ewgs", "lsq", "sqakd", "resnet20", "folder"):
        assert name in result.output
    assert "observers:  native, minmax, mse, percentile" in result.output


# ------------------------------------------------------------------------ export and verify
@pytest.fixture(scope="module")
def quantized_run(
    tiny_tree: Path, teacher_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    tmp = tmp_path_factory.mktemp("quantized")
    result = invoke(
        "quantize", *common(tiny_tree, tmp), "-s", f"teacher.checkpoint={teacher_run / 'model.safetensors'}",
        "-s", "quant.method=lsq", "-o", str(tmp / "run"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_export_then_verify_a_run(quantized_run: Path):
    exported = invoke("export", "--run", str(quantized_run))
    assert exported.exit_code == 0, exported.output
    assert (quantized_run / "model.onnx").is_file() and (
        quantized_run / "model.packed.safetensors"
    ).is_file()
    assert "QuantizeLinear" in exported.stdout or "int8" in exported.stdout
    assert "packed weights" in exported.stdout and "smaller" in exported.stdout
    verified = invoke("verify", "--run", str(quantized_run), "--per-layer")
    assert verified.exit_code == 0, verified.output
    assert "\nPASSED: predictions agree" in verified.stdout and "of 60 images" in verified.stdout
    assert "layer1.0.conv1" in verified.stdout  # the per-layer table


def test_export_for_integer_kernels(quantized_run: Path, tmp_path: Path):
    exported = invoke(
        "export", "--run", str(quantized_run), "-o", str(tmp_path / "int.onnx"), "--integer-kernels"
    )
    assert exported.exit_code == 0, exported.output
    assert "integer kernels: clip moved onto the codes in" in exported.stdout
    assert (tmp_path / "int.onnx").is_file()


def test_verify_fails_with_exit_1_when_predictions_disagree(quantized_run: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    assert invoke("export", "--run", str(quantized_run)).exit_code == 0
    state = load_file(str(quantized_run / "model.safetensors"))
    state["fc.weight"] = -state["fc.weight"]  # the float classifier reversed: other predictions
    save_file(state, str(tmp_path / "other.safetensors"))
    result = invoke(
        "verify", "--run", str(quantized_run), "--weights", str(tmp_path / "other.safetensors")
    )
    assert result.exit_code == 1 and "\nFAILED: predictions agree" in result.stdout


def _renamed_classifier(run: Path, prefix: str, path: Path) -> Path:
    """The run's weights with the classifier ``fc.`` saved under ``prefix`` instead."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "model.safetensors"))
    save_file({(prefix + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()}, str(path))  # fmt: skip
    return path


def _top1(result) -> float:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])["top1"]


def test_weights_with_another_classifier_name_load_with_a_key_map(
    quantized_run: Path, tmp_path: Path
):
    expected = json.loads((quantized_run / "summary.json").read_text())["last"]["top1"]
    linear = _renamed_classifier(quantized_run, "linear.", tmp_path / "linear.safetensors")
    run = ("--run", str(quantized_run))
    top1 = _top1(invoke("eval", *run, "--weights", str(linear), "--key-map", "linear.=fc."))
    assert top1 == pytest.approx(expected)
    head = _renamed_classifier(quantized_run, "head.", tmp_path / "head.safetensors")
    line = error_of(invoke("eval", *run, "--weights", str(head)))  # no map: one line naming them
    assert "head.weight" in line and f"weights {head}" in line
    maps = ("--key-map", "head.=fc.", "--key-map", "nothing.=fc.")
    line = error_of(invoke("eval", *run, "--weights", str(head), *maps))
    assert f"key map entry 'nothing.' matches no key of weights {head}" in line
    assert "--key-map 'fc' must look like OLD=NEW" in error_of(
        invoke("eval", *run, "--weights", str(head), "--key-map", "fc")
    )
    top1 = _top1(invoke("eval", *run, "--weights", str(head), "--key-map", "head.=fc."))
    assert top1 == pytest.approx(expected)
    onnx = tmp_path / "head.onnx"
    exported = invoke(
        "export", *run, "--weights", str(head), "--key-map", "head.=fc.", "-o", str(onnx)
    )
    assert exported.exit_code == 0, exported.output
    verified = invoke(
        "verify", *run, "--weights", str(head), "--key-map", "head.=fc.", "--onnx", str(onnx)
    )
    assert verified.exit_code == 0 and "\nPASSED: predictions agree" in verified.stdout
    line = error_of(invoke("verify", *run, "--weights", str(head), "--onnx", str(onnx)))
    assert "head.weight" in line


def test_export_and_verify_bad_input_is_one_line(
    teacher_run: Path, quantized_run: Path, tmp_path: Path
):
    assert "float model" in error_of(
        invoke("export", "--run", str(teacher_run), "-o", str(tmp_path / "t.onnx"))
    )
    line = error_of(
        invoke("export", "--run", str(quantized_run), "-o", str(tmp_path / "missing" / "m.onnx"))
    )
    assert "does not exist" in line
    assert "not found" in error_of(invoke("export", "--run", str(tmp_path / "nowhere")))
    line = error_of(
        invoke("verify", "--run", str(quantized_run), "--onnx", str(tmp_path / "none.onnx"))
    )
    assert "sqakd export" in line
    assert "--output" in error_of(invoke("export"))


def test_the_cli_needs_no_click_of_its_own():
    """typer >= 0.2x vendors click and no longer installs it: the CLI must import without it."""
    import subprocess
    import sys

    code = "import sys; sys.modules['click'] = None; import sqakd.cli; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-500:]
