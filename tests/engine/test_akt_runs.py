"""AKT end to end on the tiny image folders with only a teacher checkpoint: the training split is
never read (the test split only evaluates), the generator and the student train, RFD is logged,
and the generator is in the run's checkpoint."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from sqakd import data as datasets
from sqakd import pipeline
from sqakd.cli import app
from sqakd.config import load_config
from sqakd.engine import safe_torch_load


def test_an_akt_run_never_touches_the_training_split(
    tmp_path, image_tree, teacher_weights, monkeypatch
):
    real_load = datasets.load_images

    def guarded(format, root, split, **options):
        if split == "train":
            raise AssertionError("a data-free method read the training split")
        return real_load(format, root, split=split, **options)

    monkeypatch.setattr(datasets, "load_images", guarded)
    settings = [
        f"data.root={image_tree}", "data.batch_size=4", "data.eval_batch_size=6",
        "model.name=small_cnn", "model.kwargs={width: 8}", "model.num_classes=2",
        f"teacher.checkpoint={teacher_weights}", "method.name=akt", "method.warmup_epochs=1",
        "quant.method=minmax", "quant.first_last=same", "quant.per_channel_weights=true",
        "train.epochs=2", "train.max_steps_per_epoch=2", "run.progress=false",
        f"run.output={tmp_path / 'run'}", "run.compile=false",
    ]  # fmt: skip
    result = pipeline.run(load_config(None, settings))
    assert result.labels_used is False and "top1" in result.last
    assert "data-free" in (tmp_path / "run" / "train.log").read_text()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"train_g_bns", "train_g_margin", "train_entropy", "train_rfd"} <= set(header)
    assert all(len(row.split(",")) == len(header) for row in rows)  # one column set
    last = dict(zip(header, rows[-1].split(","), strict=True))
    assert last["phase"] == "train" and float(last["train_rfd"]) > 0
    state = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "generator.project.weight" in state["method"]
    assert set(state["optimizers"]) == {"weights", "generator"}
    # small_cnn has no residual blocks: its registered stage outputs are tapped
    assert "RFD taps: relu1, relu2, relu3" in (tmp_path / "run" / "train.log").read_text()
    # sqakd generate: one row of 3 images per class from the saved generator (8 px + 2 padding)
    outcome = CliRunner().invoke(
        app, ["generate", "--run", str(tmp_path / "run"), "--per-class", "3"]
    )
    assert outcome.exit_code == 0, outcome.output
    with Image.open(tmp_path / "run" / "generated.png") as picture:
        assert picture.size == (3 * 10, 2 * 10) and picture.mode == "RGB"
    with pytest.raises(ValueError, match="warmup_epochs is 4"):
        pipeline.run(load_config(None, [*settings[:-2], "method.warmup_epochs=4",
                                        f"run.output={tmp_path / 'again'}"]))  # fmt: skip


def test_an_akt_run_needs_only_the_teacher_checkpoint(tmp_path, teacher_weights, monkeypatch):
    def no_images(*args, **options):
        raise AssertionError("a run without data.root read images")

    monkeypatch.setattr(datasets, "load_images", no_images)
    settings = [
        "data.image_size=[8, 8]", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]",
        "data.batch_size=4", "model.name=small_cnn", "model.kwargs={width: 8}",
        "model.num_classes=2", f"teacher.checkpoint={teacher_weights}", "method.name=akt",
        "method.warmup_epochs=1", "quant.method=minmax", "train.epochs=2",
        "train.max_steps_per_epoch=2", "run.progress=false", "run.compile=false",
    ]  # fmt: skip
    result = pipeline.run(load_config(None, [*settings, f"run.output={tmp_path / 'run'}"]))
    assert result.last == {} and result.labels_used is False
    log = (tmp_path / "run" / "train.log").read_text()
    assert "data-free (no training images read)" in log and "no test images, so no accuracy" in log
    assert (tmp_path / "run" / "model.safetensors").is_file()
    recorded = load_config(tmp_path / "run" / "config.yaml").data
    assert recorded.mean == (0.5, 0.5, 0.5) and recorded.image_size == (8, 8)
    with pytest.raises(ValueError, match="set data.mean and data.std"):
        pipeline.run(load_config(None, [*settings, "data.mean=null",
                                        f"run.output={tmp_path / 'again'}"]))  # fmt: skip
    with pytest.raises(ValueError, match="or, with no images at all, set data.image_size"):
        pipeline.run(load_config(None, [*settings[3:], f"run.output={tmp_path / 'other'}"]))


def test_rfd_in_a_bf16_run_is_computed_in_float32(tmp_path, image_tree, teacher_weights):
    """Under run.precision=bf16 the maps are bfloat16 but RFD's arithmetic is float32: its value
    stays positive and near the float32 run's (computed in bfloat16 it is noise, often < 0)."""
    values = {}
    for precision in ("float32", "bf16"):
        settings = [
            f"data.root={image_tree}", "data.batch_size=4", "data.eval_batch_size=6",
            "model.name=small_cnn", "model.kwargs={width: 8}", "model.num_classes=2",
            f"teacher.checkpoint={teacher_weights}", "method.name=akt", "method.warmup_epochs=1",
            "quant.method=minmax", "quant.first_last=same", "train.epochs=2",
            "train.max_steps_per_epoch=2", "run.progress=false", f"run.precision={precision}",
            f"run.output={tmp_path / precision}", "run.compile=false",
        ]  # fmt: skip
        pipeline.run(load_config(None, settings))
        header, *rows = (tmp_path / precision / "metrics.csv").read_text().splitlines()
        column = header.split(",").index("train_rfd")
        values[precision] = [float(row.split(",")[column]) for row in rows]
    assert all(v > 0 for v in values["bf16"])
    for low, full in zip(values["bf16"], values["float32"]):
        assert abs(low - full) < 0.25 * full
