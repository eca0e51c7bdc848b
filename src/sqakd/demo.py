"""``sqakd demo``: why label-free matters, in a few minutes on a CPU, on Fashion-MNIST.

The situation SQAKD exists for: a trained full-precision model, many images, few labels. The demo
trains a small teacher near convergence, then, at W4A4 and W2A2, three students that each take the
same number of optimizer steps:

- labeled QAT on a small labeled fraction of the training images (default 1 %, stratified: every
  class in proportion), which is all a user with few labels can run it on;
- labeled QAT on every label (what a fully labeled data set would allow);
- label-free SQAKD on every image, reading no label.

It prints a table, plots accuracy against the number of labels read, and writes both, with every
run's folder (config, log, metrics, checkpoint), into the output folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import load_config
from .engine import get_logger, setup_console_logging
from .methods import method_class
from .pipeline import RunResult, quantize, train_teacher

FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
BATCH_SIZE = 128


def _check_data(folder: Path) -> None:
    missing = [name for name in FASHION_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"Fashion-MNIST is not in {folder} (missing {', '.join(missing)}); install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or put the four original .gz IDX files in a "
            "folder and pass --data FOLDER"
        )


def demo_base(
    output: Path, data: Path, limit: int | None, device: str, overwrite: bool
) -> dict[str, Any]:
    """The shared part of every demo run's configuration."""
    return {
        "run": {"output": str(output), "device": device, "overwrite": overwrite, "seed": 0},
        "data": {
            "format": "fashion-mnist",
            "root": str(data),
            "batch_size": BATCH_SIZE,
            "eval_batch_size": 1000,
            # no augmentation: at a few epochs it only slows the teacher's convergence (5
            # epochs: 90.8 % without, 88.5 % with crop and flip in 4)
            "augment": {"crop_padding": 0, "flip": False},
            "limit_train": limit,
            # stratified draws with one seed are nested: the few-label subset lies inside --limit's
            "stratified_limit": True,
        },
        "model": {"name": "small_cnn"},
    }


@dataclass(frozen=True)
class Student:
    """One demo student: its method, bit width, and how many training images it may read."""

    method: str
    bits: int
    images: int  # training images it reads (the labeled subset for QAT on few labels)
    all_images: int  # the training set's size

    @property
    def folder(self) -> str:
        share = "all" if self.images >= self.all_images else f"{self.images}"
        return f"{self.method}_w{self.bits}a{self.bits}_{share}"

    @property
    def labels_read(self) -> int:
        return self.images if self.method == "qat" else 0  # SQAKD reads no label

    def schedule(self, steps: int) -> tuple[int, int]:
        """``(epochs, steps per epoch)`` giving ``steps`` optimizer steps (as near as whole epochs
        allow) on this student's images at the demo's batch size (the last partial batch is
        dropped, as the training loader does)."""
        per_epoch = max(self.images // BATCH_SIZE, 1)
        epochs = max(math.ceil(steps / per_epoch), 1)
        return epochs, min(per_epoch, math.ceil(steps / epochs))

    def settings(self, steps: int, checkpoint: Path, output: Path) -> list[str]:
        epochs, per_epoch = self.schedule(steps)
        settings = [
            f"run.output={output / self.folder}",
            f"teacher.checkpoint={checkpoint}",
            f"method.name={self.method}",
            f"quant.weight_bits={self.bits}",
            f"quant.act_bits={self.bits}",
            f"train.epochs={epochs}",
            f"train.max_steps_per_epoch={per_epoch}",
            f"train.eval_every={epochs}",  # measured once, after its last step
            f"train.checkpoint_every={epochs}",
        ]
        if self.images < self.all_images:
            settings.append(f"data.limit_train={self.images}")
        return settings


def demo_students(all_images: int, labeled_fraction: float) -> list[Student]:
    """Per bit width: QAT on the labeled fraction, QAT on every label, SQAKD on every image."""
    if not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(
            f"--labeled-fraction must be in (0, 1], got {labeled_fraction}; e.g. 0.01 for 1 %"
        )
    labeled = max(round(labeled_fraction * all_images), BATCH_SIZE)
    students = []
    for bits in (4, 2):
        if labeled < all_images:
            students.append(Student("qat", bits, labeled, all_images))
        students += [Student("qat", bits, all_images, all_images)]
        students += [Student("sqakd", bits, all_images, all_images)]
    return students


@dataclass
class DemoRow:
    """One line of the demo's table."""

    result: RunResult
    labels_read: int
    images: int
    steps: int

    @property
    def name(self) -> str:
        result = self.result
        if result.weight_bits is None:
            return "teacher (float)"
        return f"{method_class(result.method).label} W{result.weight_bits}A{result.act_bits}"


def _training_images(data: Path, limit: int | None) -> int:
    from .data import load_images

    count = len(load_images("fashion-mnist", data, "train", cache=False))
    return min(count, limit) if limit else count


def run_demo(
    output: Path,
    data: Path,
    teacher_epochs: int = 5,
    steps: int = 240,
    labeled_fraction: float = 0.01,
    limit: int | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> list[DemoRow]:
    """Teacher, then the students of :func:`demo_students` with ``steps`` optimizer steps each;
    writes ``results.md`` and ``demo.png`` into ``output`` and returns the table's rows."""
    setup_console_logging()
    log = get_logger()
    _check_data(data)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"demo folder {output} already holds results; pass --overwrite or choose --output"
        )
    all_images = _training_images(data, limit)
    students = demo_students(all_images, labeled_fraction)
    base = demo_base(output, data, limit, device, overwrite)
    total = len(students) + 1
    log.info("1/%d training the full-precision teacher (%d epochs)", total, teacher_epochs)
    teacher = train_teacher(
        load_config(
            None,
            [
                f"run.output={output / 'teacher'}",
                f"train.epochs={teacher_epochs}",
                "train.weights.lr=0.004",
            ],
            base=base,
        )
    )
    checkpoint = Path(teacher.run_dir) / "model.safetensors"
    teacher_steps = teacher_epochs * (all_images // BATCH_SIZE)
    rows = [DemoRow(teacher, all_images, all_images, teacher_steps)]
    for index, student in enumerate(students, start=2):
        epochs, per_epoch = student.schedule(steps)
        log.info(
            "%d/%d %s W%dA%d on %d images (%d labels read), %d optimizer steps",
            index, total, student.method, student.bits, student.bits, student.images,
            student.labels_read, epochs * per_epoch,
        )  # fmt: skip
        config = load_config(None, student.settings(steps, checkpoint, output), base=base)
        result = quantize(config)
        rows.append(DemoRow(result, student.labels_read, student.images, epochs * per_epoch))
    table = results_table(rows)
    (output / "results.md").write_text(table + "\n")
    plot_results(rows, output / "demo.png")
    print("\n" + table)
    log.info(
        "wrote %s, %s and every run's checkpoint under %s",
        output / "results.md",
        output / "demo.png",
        output,
    )
    return rows


def results_table(rows: list[DemoRow]) -> str:
    """A Markdown table: one row per run, what it read, its steps, accuracy, size and time."""
    lines = [
        "| model | labels read | images | optimizer steps | top-1 (%) | weights (KiB) | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = row.result
        lines.append(
            f"| {row.name} | {row.labels_read:,} | {row.images:,} | {row.steps:,} | "
            f"{result.last.get('top1', float('nan')):.2f} | "
            f"{result.quantized_bytes / 1024:.1f} | {result.minutes:.1f} |"
        )
    return "\n".join(lines)


def plot_results(rows: list[DemoRow], path: Path) -> None:
    """Test top-1 against the number of labels read (symmetric-log axis, so 0 has a place):
    one line per bit width through its labeled QAT students, SQAKD's point at 0 labels, and the
    teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    colours = {4: "#1f77b4", 2: "#d62728"}
    for bits, colour in colours.items():
        mine = [row for row in rows if row.result.weight_bits == bits]
        labeled = sorted((r for r in mine if r.labels_read), key=lambda r: r.labels_read)
        axis.plot(
            [r.labels_read for r in labeled],
            [r.result.last.get("top1", math.nan) for r in labeled],
            "o-", color=colour, label=f"QAT (labels) W{bits}A{bits}",
        )  # fmt: skip
        for row in (r for r in mine if not r.labels_read):
            axis.plot(
                [0], [row.result.last.get("top1", math.nan)], "*", markersize=14, color=colour,
                label=f"SQAKD (no labels, all images) W{bits}A{bits}",
            )  # fmt: skip
    teacher = next((row for row in rows if row.result.weight_bits is None), None)
    if teacher is not None:
        axis.axhline(
            teacher.result.last.get("top1", math.nan),
            color="#555555", linestyle="--", label="teacher (float)",
        )  # fmt: skip
    axis.set_xscale("symlog", linthresh=100)
    axis.set_xlim(-20, max(row.labels_read for row in rows) * 2)
    axis.set_xlabel("labels read by the student (symmetric log scale)")
    axis.set_ylabel("Fashion-MNIST test top-1 (%)")
    axis.set_title("Same optimizer steps per student: labeled QAT vs label-free SQAKD")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
