"""``sqakd demo``: the whole product in a few minutes on a CPU, on Fashion-MNIST.

Trains a small full-precision teacher, then label-free SQAKD students at W4A4 and W2A2 and, at the
same budget, labeled cross-entropy QAT baselines; prints a table and writes a plot, the table and
every checkpoint into the run folder.
"""

from __future__ import annotations

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
            "batch_size": 128,
            "eval_batch_size": 1000,
            "augment": {"crop_padding": 2, "flip": True},
            "limit_train": limit,
        },
        "model": {"name": "small_cnn"},
    }


def run_demo(
    output: Path,
    data: Path,
    teacher_epochs: int = 4,
    epochs: int = 1,
    limit: int | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> list[RunResult]:
    setup_console_logging()
    log = get_logger()
    _check_data(data)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"demo folder {output} already holds results; pass --overwrite or choose --output"
        )
    base = demo_base(output, data, limit, device, overwrite)
    log.info("1/5 training the full-precision teacher (%d epochs)", teacher_epochs)
    teacher = train_teacher(
        load_config(
            None,
            [
                f"run.output={output / 'teacher'}",
                f"train.epochs={teacher_epochs}",
                "train.weights.lr=0.002",
            ],
            base=base,
        )
    )
    checkpoint = Path(teacher.run_dir) / "model.safetensors"
    results = [teacher]
    students = [("sqakd", 4), ("qat", 4), ("sqakd", 2), ("qat", 2)]
    for index, (method, bits) in enumerate(students, start=2):
        labels = "labeled CE baseline" if method == "qat" else "label-free"
        log.info("%d/5 %s W%dA%d (%s, %d epochs)", index, method, bits, bits, labels, epochs)
        results.append(
            quantize(
                load_config(
                    None,
                    [
                        f"run.output={output / f'{method}_w{bits}a{bits}'}",
                        f"teacher.checkpoint={checkpoint}",
                        f"method.name={method}",
                        f"quant.weight_bits={bits}",
                        f"quant.act_bits={bits}",
                        f"train.epochs={epochs}",
                    ],
                    base=base,
                )
            )
        )
    table = results_table(results)
    (output / "results.md").write_text(table + "\n")
    plot_results(results, output / "demo.png")
    print("\n" + table)
    log.info(
        "wrote %s, %s and every run's checkpoint under %s",
        output / "results.md",
        output / "demo.png",
        output,
    )
    return results


def row_name(result: RunResult) -> str:
    if result.weight_bits is None:
        return "teacher (float)"
    return f"{method_class(result.method).label} W{result.weight_bits}A{result.act_bits}"


def results_table(results: list[RunResult]) -> str:
    """A Markdown table: one row per run, accuracy, size and time."""
    lines = [
        "| model | labels read | epochs | top-1 last (%) | top-1 best (%) | weights (KiB) | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {row_name(result)} | {'yes' if result.labels_used else 'no'} | {result.epochs} | "
            f"{result.last.get('top1', float('nan')):.2f} | {result.best.get('top1', float('nan')):.2f} | "
            f"{result.quantized_bytes / 1024:.1f} | {result.minutes:.1f} |"
        )
    return "\n".join(lines)


def plot_results(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row_name(r) for r in results]
    accuracy = [r.last.get("top1", 0.0) for r in results]
    figure, axis = plt.subplots(figsize=(8, 3.8))
    colours = [
        "#555555" if r.weight_bits is None else "#ff7f0e" if r.labels_used else "#1f77b4"
        for r in results
    ]
    bars = axis.barh(names, accuracy, color=colours)
    axis.bar_label(bars, fmt="%.2f", padding=3)
    axis.set_xlim(min(accuracy) - 10 if accuracy else 0, 100)
    axis.invert_yaxis()
    axis.set_xlabel("Fashion-MNIST test top-1 (%)")
    axis.set_title("sqakd demo: label-free SQAKD vs labeled QAT at the same budget")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
