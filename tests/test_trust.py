"""Trust and failure (issue 22): a run folder is never corrupted, every fixable error is one line,
nothing is silently wrong. Each defect found by trying bad inputs has a test here that failed
before its fix; the runs use 8x8 images and a two-layer-wide ``small_cnn``, so they take seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sqakd.cli import app

runner = CliRunner()
CLASSES = ("ant", "bee", "cat")


def write_images(folder: Path, count: int, low: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(low, low + 96, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/{ant,bee,cat} (12 each) and test/{ant,bee,cat} (4 each), 8x8 RGB; the classes
    differ in brightness so that a trained model tells them apart."""
    root = tmp_path_factory.mktemp("images")
    for split, count in (("train", 12), ("test", 4)):
        for label, name in enumerate(CLASSES):
            write_images(root / split / name, count, 60 * label, seed=label + 10 * len(split))
    return root


def settings(tree: Path, cache: Path, *extra: str) -> list[str]:
    values = [
        f"data.root={tree}", f"data.cache_dir={cache}", "data.batch_size=6",
        "data.eval_batch_size=12", "model.name=small_cnn", "model.kwargs={width: 4}",
        "run.progress=false", "run.threads=1", "train.epochs=1", "quant.first_last=float",
        "quant.method=lsq", *extra,
    ]  # fmt: skip
    return [part for value in values for part in ("-s", value)]


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def one_line_error(result) -> str:
    """The single ``error:`` line of a refused command (exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def teacher(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    result = invoke(
        "train", *settings(tree, out / "cache", "train.weights.lr=0.01"), "-o", out / "run"
    )
    assert result.exit_code == 0, result.output
    return out / "run" / "model.safetensors"


@pytest.fixture(scope="module")
def w4_run(tree: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w4")
    args = settings(tree, out / "cache", f"teacher.checkpoint={teacher}")
    result = invoke("quantize", *args, "-o", out / "run")
    assert result.exit_code == 0, result.output
    return out / "run"


def quantize_args(tree: Path, teacher: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "quantize",
        *settings(tree, tmp_path / "cache", f"teacher.checkpoint={teacher}", *extra),
    ]


# ------------------------------------------------------------ 1. classes mapped by name
def test_a_test_split_missing_a_class_keeps_every_label(tree: Path, tmp_path: Path):
    from sqakd.config import DataConfig
    from sqakd.pipeline import load_data

    root = tmp_path / "gap"
    shutil.copytree(tree, root)
    shutil.rmtree(root / "test" / "ant")  # bee and cat would become labels 0 and 1
    bundle = load_data(DataConfig(root=root, cache_dir=tmp_path / "cache"))
    assert bundle.classes == list(CLASSES) and bundle.test.classes == list(CLASSES)
    assert sorted(set(bundle.test.labels.tolist())) == [1, 2]  # bee, cat: as in training
    assert bundle.num_classes == 3
    # eval reads only the test split: the class names recorded in config.yaml map it
    alone = load_data(DataConfig(root=root, classes=list(CLASSES), mean=(0.5,) * 3,
                                 std=(0.2,) * 3, cache_dir=tmp_path / "cache"), need_train=False)  # fmt: skip
    assert sorted(set(alone.test.labels.tolist())) == [1, 2]


def test_a_test_split_with_a_class_training_lacks_is_refused(tree: Path, tmp_path: Path):
    from sqakd.config import DataConfig
    from sqakd.pipeline import load_data

    root = tmp_path / "extra"
    shutil.copytree(tree, root)
    write_images(root / "test" / "dog", 2, 0, seed=5)
    with pytest.raises(ValueError, match="'dog'"):
        load_data(DataConfig(root=root, cache_dir=tmp_path / "cache"))


def test_a_run_records_its_class_names(w4_run: Path):
    saved = yaml.safe_load((w4_run / "config.yaml").read_text())
    assert saved["data"]["classes"] == list(CLASSES)


# ------------------------------------------------------------ 2. resume with another config
def test_resume_with_other_bits_is_refused_and_config_kept(
    tree: Path, teacher: Path, w4_run: Path, tmp_path: Path
):
    run = tmp_path / "run"
    shutil.copytree(w4_run, run)
    before = snapshot(run)
    line = one_line_error(
        invoke(
            *quantize_args(tree, teacher, tmp_path, "quant.weight_bits=2"), "-o", run, "--resume"
        )
    )
    assert "quant.weight_bits: 4 -> 2" in line and "--resume" in line
    line = one_line_error(
        invoke(
            *quantize_args(tree, teacher, tmp_path, "model.kwargs={width: 8}"),
            "-o",
            run,
            "--resume",
        )
    )
    assert "model.kwargs.width" in line
    assert snapshot(run) == before  # config.yaml (and everything else) untouched


def test_resume_may_add_epochs_and_never_rewrites_config(
    tree: Path, teacher: Path, w4_run: Path, tmp_path: Path
):
    run = tmp_path / "run"
    shutil.copytree(w4_run, run)
    config_before = (run / "config.yaml").read_bytes()
    result = invoke(
        *quantize_args(tree, teacher, tmp_path, "train.epochs=2", "run.progress=true"),
        "-o", run, "--resume",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert (run / "config.yaml").read_bytes() == config_before


def test_resume_with_nothing_to_resume_is_refused(tree: Path, teacher: Path, tmp_path: Path):
    line = one_line_error(
        invoke(*quantize_args(tree, teacher, tmp_path), "-o", tmp_path / "new", "--resume")
    )
    assert "nothing to resume" in line and str(tmp_path / "new") in line
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------ 3. --overwrite replaces completely
def test_overwrite_leaves_nothing_of_the_earlier_run(
    tree: Path, teacher: Path, w4_run: Path, tmp_path: Path
):
    run = tmp_path / "run"
    shutil.copytree(w4_run, run)
    (run / "model.onnx").write_bytes(b"stale export of the earlier weights")
    (run / "notes.txt").write_text("mine")
    result = invoke(
        *quantize_args(tree, teacher, tmp_path, "train.epochs=2"), "-o", run, "--overwrite"
    )
    assert result.exit_code == 0, result.output
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, not the earlier run's row as well
    assert not (run / "model.onnx").exists()
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: left alone


# ------------------------------------------------------------ 4. a failed run leaves nothing
@pytest.mark.parametrize(
    "mistake", ["teacher.checkpoint=/no/such/teacher.safetensors", "model.name=resnet7"]
)
def test_a_failed_run_does_not_block_the_corrected_command(
    tree: Path, teacher: Path, tmp_path: Path, mistake: str
):
    run = tmp_path / "run"
    one_line_error(invoke(*quantize_args(tree, teacher, tmp_path, mistake), "-o", run))
    assert not run.exists()
    result = invoke(*quantize_args(tree, teacher, tmp_path), "-o", run)
    assert result.exit_code == 0, result.output


def test_a_run_that_failed_before_its_first_epoch_ended_is_replaced(
    tree: Path, teacher: Path, tmp_path: Path
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    (run / "train.log").write_text("an earlier attempt that stopped in epoch 1\n")
    result = invoke(*quantize_args(tree, teacher, tmp_path), "-o", run)
    assert result.exit_code == 0, result.output
    assert "earlier attempt" not in (run / "train.log").read_text()


# ------------------------------------------------------------ 5. run folders do not run code
def test_eval_of_a_foreign_run_folder_imports_no_code(w4_run: Path, tmp_path: Path):
    run = tmp_path / "foreign"
    shutil.copytree(w4_run, run)
    marker = tmp_path / "code_ran"
    (tmp_path / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from sqakd.models import build_model\n"
        "def net(**kwargs):\n    return build_model('small_cnn', **kwargs)\n"
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["name"] = f"{tmp_path / 'evil.py'}:net"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    for command in ("eval", "export", "verify"):
        line = one_line_error(invoke(command, "--run", run))
        assert "--trust-code" in line and "evil.py" in line
    assert not marker.exists()
    result = invoke("eval", "--run", run, "--trust-code")
    assert result.exit_code == 0, result.output
    assert marker.exists()


# ------------------------------------------------------------ 6. YAML bombs
def test_a_billion_laughs_recipe_is_refused_quickly(tmp_path: Path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    for place in ("run:\n  seed: *a8\n", "model:\n  kwargs: {x: *a8}\n"):
        path = tmp_path / "bomb.yaml"
        path.write_text("\n".join(lines) + "\n" + place)
        line = one_line_error(invoke("quantize", "-c", path, "-o", tmp_path / "run"))
        assert "aliases" in line and len(line) < 400
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ 7. weights record their plan
def test_weights_refuse_another_quantization_plan(w4_run: Path):
    from safetensors import safe_open

    with safe_open(str(w4_run / "model.safetensors"), framework="pt") as handle:
        plan = json.loads(handle.metadata()["sqakd.quant"])
    assert plan["weight_bits"] == 4 and plan["method"] == "lsq"
    line = one_line_error(invoke("eval", "--run", w4_run, "-s", "quant.weight_bits=2"))
    assert "quant.weight_bits: 4 in the weights, 2 in the config" in line
    assert invoke("eval", "--run", w4_run).exit_code == 0
    # the observer only chose where the ranges started: the loaded weights compute the same
    assert invoke("eval", "--run", w4_run, "-s", "quant.observer=mse").exit_code == 0


# ------------------------------------------------------------ 8. divergence beyond NaN
def test_weights_that_blow_up_without_nan_stop_the_run(tmp_path: Path):
    from torch import nn

    from sqakd.config import MethodConfig, TrainConfig
    from sqakd.engine import RunLog, Trainer, TrainingDiverged
    from sqakd.methods import build_method

    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    trainer = Trainer(student, None, build_method(MethodConfig(name="supervised")), batches,
                      TrainConfig(epochs=3), torch.device("cpu"), RunLog(tmp_path, enabled=False),
                      checkpoint_dir=tmp_path / "checkpoints", progress=False)  # fmt: skip
    original = trainer.train_step

    def exploding(batch):  # a learning rate that multiplies the weights, finite all along
        values = original(batch)
        if trainer.epoch == 1:
            with torch.no_grad():
                for parameter in student.parameters():
                    parameter.mul_(1e4)
        return values

    trainer.train_step = exploding
    with pytest.raises(TrainingDiverged, match="weights diverged at epoch 2"):
        trainer.fit()
    kept = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert kept["epoch"] == 1  # the last good checkpoint
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in kept["student"].values())


# ------------------------------------------------------------ every user mistake: one line
def broken_teachers(teacher: Path, tmp_path: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    state = load_file(str(teacher))
    nan = tmp_path / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in state.items()}, str(nan))  # fmt: skip
    return {"truncated": truncated, "nan": nan, "folder": teacher.parent}


MISTAKES = {
    # name: (extra settings or a recipe's text, words the one line must hold)
    "yaml syntax": ("recipe:run:\n  seed: [1\n", ["recipe.yaml", "line 3"]),
    "boolean bits": (["quant.weight_bits=true"], ["quant.weight_bits", "boolean"]),
    "negative threads": (["run.threads=-2"], ["run.threads"]),
    "malformed device": (["run.device=cuda:x"], ["run.device"]),
    "missing split": (["data.train_split=training"], ["data.train_split"]),
    "teacher folder": (["teacher.checkpoint={folder}"], ["is a folder", "model.safetensors"]),
    "truncated teacher": (["teacher.checkpoint={truncated}"], ["truncated.safetensors", "corrupt"]),
    "nan teacher": (["teacher.checkpoint={nan}"], ["NaN", "nan.safetensors"]),
    "unlabeled test split": (["data.test_format=unlabeled"], ["no labels", "data.test_split"]),
    "resume nothing": (["--resume"], ["nothing to resume"]),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_every_user_mistake_is_one_line_and_touches_no_folder(
    name: str, tree: Path, teacher: Path, w4_run: Path, tmp_path: Path
):
    given, words = MISTAKES[name]
    teachers = {key: str(path) for key, path in broken_teachers(teacher, tmp_path).items()}
    args = quantize_args(tree, teacher, tmp_path)
    if isinstance(given, str):  # a recipe file
        (tmp_path / "recipe.yaml").write_text(given.removeprefix("recipe:"))
        args += ["-c", str(tmp_path / "recipe.yaml")]
    else:
        for value in given:
            args += ["--resume"] if value == "--resume" else ["-s", value.format(**teachers)]
    run = tmp_path / "run"
    line = one_line_error(invoke(*args, "-o", run))
    for word in words:
        assert word in line, line
    assert "with_labels" not in line and "data.split " not in line
    assert not run.exists()  # nothing created
    if name == "resume nothing":
        return  # on a run folder, --resume has something to resume
    existing = tmp_path / "existing"  # nor an earlier run changed
    shutil.copytree(w4_run, existing)
    before = snapshot(existing)
    one_line_error(invoke(*args, "-o", existing, "--overwrite"))
    assert snapshot(existing) == before


def test_a_full_disk_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import errno

    from sqakd.cli import describe_os_error
    from sqakd.engine import atomic_torch_save

    def full(*args, **kwargs):  # what torch's zip writer says when the disk fills
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . unexpected pos 95808 vs 95704"
        )

    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as caught:
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "last.pt")
    assert caught.value.errno == errno.ENOSPC
    assert "no space left" in describe_os_error(caught.value)
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    denied = PermissionError(errno.EACCES, "Permission denied", "/runs/x/config.yaml")
    assert "/runs/x/config.yaml" in describe_os_error(denied) and "-o" in describe_os_error(denied)


def test_a_bug_is_labelled_as_one(monkeypatch: pytest.MonkeyPatch):
    import sqakd.pipeline

    def broken(*args, **kwargs):
        raise KeyError("an internal slip")

    monkeypatch.setattr(sqakd.pipeline, "evaluate_model", broken)
    result = runner.invoke(app, ["eval", "--weights", "x.safetensors"])
    assert isinstance(result.exception, KeyError)
    assert "internal error: this is a bug in sqakd" in result.stderr


def test_an_unreadable_onnx_file_is_one_line(w4_run: Path, tmp_path: Path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an ONNX model")
    line = one_line_error(invoke("verify", "--run", w4_run, "--onnx", broken))
    assert "broken.onnx" in line


def test_a_folder_given_as_a_file_is_named_as_a_folder(w4_run: Path):
    line = one_line_error(invoke("eval", "--run", w4_run, "--weights", w4_run))
    assert "is a folder" in line and "model.safetensors" in line
    line = one_line_error(invoke("eval", "-c", w4_run, "--weights", w4_run / "model.safetensors"))
    assert "is a folder" in line and "config.yaml" in line


def test_a_loss_that_grows_by_orders_of_magnitude_stops_the_run(tmp_path: Path):
    from torch import nn

    from sqakd.config import MethodConfig, TrainConfig
    from sqakd.engine import RunLog, Trainer, TrainingDiverged
    from sqakd.methods import build_method

    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))]
    trainer = Trainer(student, None, build_method(MethodConfig(name="supervised")), batches,
                      TrainConfig(epochs=2), torch.device("cpu"), RunLog(tmp_path, enabled=False),
                      progress=False)  # fmt: skip
    trainer.check_divergence(2.3)  # the first epoch sets the yardstick
    trainer.check_divergence(50.0)  # worse, not diverged
    with pytest.raises(TrainingDiverged, match="loss diverged"):
        trainer.check_divergence(1e6)
