"""``sqakd``: a thin command line over the public API. Every error is one line, never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Label-free quantization-aware training by self-supervised knowledge distillation.",
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML recipe (see configs/)")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="override a config key, e.g. -s quant.weight_bits=2 (repeatable)"
    ),
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="run folder (run.output)")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="replace an earlier run in the run folder")
]
ResumeOption = Annotated[bool, typer.Option("--resume", help="continue the run in the run folder")]

F = TypeVar("F", bound=Callable[..., Any])


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"sqakd {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Label-free quantization-aware training by self-supervised knowledge distillation."""


#: typer's own exits and usage errors, passed through (typer >= 0.2x vendors click, so ``click``
#: itself may not be installed; older typer re-exports click's classes under these names)
TYPER_CONTROL_FLOW: tuple[type[BaseException], ...] = tuple(
    getattr(typer, name)
    for name in ("Exit", "Abort", "BadParameter", "TyperException")
    if hasattr(typer, name)
)


def one_line_errors(command: F) -> F:
    """The CLI's one error boundary: every expected failure (a value or setting to fix, a missing
    or unreadable file, an OS error such as a full disk or a read-only folder, a diverged run)
    becomes one ``error: ...`` line on stderr and exit code 2; anything else is a bug, shown as
    a traceback after a line saying so."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .engine import TrainingDiverged

        try:
            return command(*args, **kwargs)
        except (ValueError, ImportError, TrainingDiverged) as error:
            _fail(str(error))
        except OSError as error:
            _fail(describe_os_error(error))
        except KeyboardInterrupt:
            typer.echo(
                "interrupted; the last checkpoint is kept (continue with --resume)", err=True
            )
            raise typer.Exit(130) from None
        except TYPER_CONTROL_FLOW:
            raise
        except Exception as error:
            if type(error).__module__.split(".")[0] in FILE_FORMAT_LIBRARIES:
                _fail(f"{error} ({type(error).__name__}); the file is corrupt or not of its kind")
            typer.echo(
                "internal error: this is a bug in sqakd, not in your input; please report it "
                "with the traceback below (the run's train.log holds what happened before)",
                err=True,
            )
            raise

    return wrapper  # type: ignore[return-value]


#: libraries whose exceptions mean "this file cannot be read" (ONNX Runtime's load errors, ...)
FILE_FORMAT_LIBRARIES = ("onnxruntime", "onnx", "safetensors", "google", "yaml")


def _fail(message: str) -> None:
    lines = [line for line in message.splitlines() if line.strip()] or ["failed"]
    typer.echo(f"error: {lines[0][:2000]}", err=True)
    raise typer.Exit(2) from None


def describe_os_error(error: OSError) -> str:
    """One line for an OS error, with the fix: no space left, no permission, no such file."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return (
            f"no space left on the device{where}; free some space and continue with --resume "
            "(the last complete checkpoint is kept)"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write or read{where}; choose a folder you can write (-o)"
    if error.errno == errno.ENOENT:
        return f"no such file or folder{where}"
    return f"{error.strerror or error}{where}"


def _config(
    config: Path | None,
    overrides: list[str] | None,
    output: Path | None = None,
    overwrite: bool = False,
    base: dict[str, Any] | None = None,
):
    from .config import load_config

    extra = list(overrides or [])
    if output is not None:
        extra.append(f"run.output={output}")
    if overwrite:
        extra.append("run.overwrite=true")
    return load_config(config, extra, base=base)


def _print_result(result: Any) -> None:
    import os
    from dataclasses import asdict

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    summary = asdict(result)
    typer.echo(
        json.dumps(
            {k: summary[k] for k in ("run_dir", "method", "last", "best", "teacher")}, indent=2
        )
    )


@app.command()
@one_line_errors
def train(
    config: ConfigOption = None,
    set: SetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    resume: ResumeOption = False,
) -> None:
    """Train a full-precision teacher with labels."""
    from .pipeline import train_teacher

    _print_result(train_teacher(_config(config, set, output, overwrite), resume=resume))


@app.command()
@one_line_errors
def quantize(
    config: ConfigOption = None,
    set: SetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    resume: ResumeOption = False,
) -> None:
    """Quantization-aware training of a copy of the teacher (method.name: sqakd by default)."""
    from .pipeline import quantize as run_quantize

    _print_result(run_quantize(_config(config, set, output, overwrite), resume=resume))


WeightsOption = Annotated[
    Path | None, typer.Option(help="model.safetensors of a run, or a checkpoint")
]
RunOption = Annotated[
    Path | None, typer.Option(help="a run folder: uses its config.yaml and model.safetensors")
]
KeyMapOption = Annotated[
    list[str] | None,
    typer.Option(
        "--key-map",
        help="rename a key prefix of the weights before loading, OLD=NEW, e.g. linear.=fc. "
        "(repeatable; as teacher.key_map)",
    ),
]


def _key_map(entries: list[str] | None) -> dict[str, str]:
    """``["linear.=fc."]`` -> ``{"linear.": "fc."}`` (NEW may be empty: drop the prefix)."""
    key_map: dict[str, str] = {}
    for entry in entries or []:
        old, sep, new = entry.partition("=")
        if not sep or not old:
            raise ValueError(f"--key-map {entry!r} must look like OLD=NEW, e.g. linear.=fc.")
        key_map[old] = new
    return key_map


TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="allow the run folder's config.yaml to import Python code (model.name: "
        "'module:function'); only for run folders you trust",
    ),
]


def _run_inputs(
    run: Path | None,
    config: Path | None,
    overrides: list[str] | None,
    weights: Path | None,
    trust_code: bool = False,
):
    """Config and weights from ``--run`` (its config.yaml, model.safetensors) unless given.

    A run folder may come from someone else: its config.yaml never makes sqakd import code
    (a ``module:function`` model) unless ``--trust-code`` is given."""
    from_run = False
    if run is not None:
        if not run.is_dir():
            raise ValueError(f"run folder {run} not found; give the folder `sqakd quantize` wrote")
        from_run = config is None
        config = config or run / "config.yaml"
        weights = weights or run / "model.safetensors"
    loaded = _config(config, overrides)
    if from_run and ":" in loaded.model.name and not trust_code:
        raise ValueError(
            f"{run / 'config.yaml'} names Python code to import (model.name: "
            f"{loaded.model.name[:200]!r}); a run folder's code runs with your rights, so it is "
            "not imported unless you pass --trust-code (only for a folder you trust)"
        )
    return loaded, weights


@app.command("eval")
@one_line_errors
def evaluate(
    config: ConfigOption = None,
    set: SetOption = None,
    weights: WeightsOption = None,
    run: RunOption = None,
    key_map: KeyMapOption = None,
    trust_code: TrustOption = False,
) -> None:
    """Top-1/top-5 of a float or quantized model on the test split."""
    from .pipeline import evaluate_model

    inputs = _run_inputs(run, config, set, weights, trust_code)
    metrics = evaluate_model(*inputs, key_map=_key_map(key_map))
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
@one_line_errors
def export(
    run: RunOption = None,
    config: ConfigOption = None,
    set: SetOption = None,
    weights: WeightsOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="the .onnx file (default RUN/model.onnx)")
    ] = None,
    packed: Annotated[
        bool, typer.Option(help="also write the packed low-bit weights (.packed.safetensors)")
    ] = True,
    opset: int = 17,
    fold_batchnorm: Annotated[
        bool, typer.Option(help="fold batch norm into float convolutions")
    ] = True,
    integer_kernels: Annotated[
        bool,
        typer.Option(
            help="reshape the graph so that ONNX Runtime runs quantized layers as QLinearConv"
        ),
    ] = False,
    key_map: KeyMapOption = None,
    trust_code: TrustOption = False,
) -> None:
    """Export a quantized run to ONNX (QuantizeLinear/DequantizeLinear) and packed weights."""
    from .deploy import ONNX_NAME, export_run

    if output is None:
        if run is None:
            raise ValueError("give --output FILE.onnx, or --run RUN_FOLDER to write into it")
        output = run / ONNX_NAME
    result = export_run(
        *_run_inputs(run, config, set, weights, trust_code),
        output,
        packed,
        opset,
        fold_batchnorm,
        integer_kernels,
        key_map=_key_map(key_map),
    )
    typer.echo(str(result))


@app.command()
@one_line_errors
def verify(
    run: RunOption = None,
    config: ConfigOption = None,
    set: SetOption = None,
    weights: WeightsOption = None,
    onnx: Annotated[
        Path | None, typer.Option(help="the exported file (default RUN/model.onnx)")
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="agreement of predictions needed to pass (0..1]")
    ] = 0.99,
    per_layer: Annotated[
        bool, typer.Option(help="also compare each quantized layer alone")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="use only the first N test images")] = None,
    class_dim: Annotated[
        int | None,
        typer.Option(help="the logits' class axis (1; -1 for sequences); default method.class_dim"),
    ] = None,
    key_map: KeyMapOption = None,
    trust_code: TrustOption = False,
) -> None:
    """ONNX Runtime against PyTorch on the test images; exits 1 when agreement is too low."""
    from .deploy import ONNX_NAME, verify_run

    if onnx is None:
        if run is None:
            raise ValueError("give --onnx FILE.onnx, or --run RUN_FOLDER holding model.onnx")
        onnx = run / ONNX_NAME
    report = verify_run(
        *_run_inputs(run, config, set, weights, trust_code),
        onnx,
        threshold,
        per_layer,
        limit,
        class_dim,
        key_map=_key_map(key_map),
    )
    typer.echo(str(report))
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def demo(
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("runs/demo"),
    data: Annotated[Path, typer.Option(help="folder with the Fashion-MNIST IDX .gz files")] = Path(
        "/usr/share/datasets/fashion-mnist"
    ),
    teacher_epochs: int = 5,
    steps: Annotated[
        int, typer.Option(help="optimizer steps per student (the same for every student)")
    ] = 240,
    labeled_fraction: Annotated[
        float, typer.Option(help="the labeled share of the training images (stratified)")
    ] = 0.01,
    limit: Annotated[
        int | None, typer.Option(help="use only this many training images (quick look)")
    ] = None,
    overwrite: OverwriteOption = False,
    device: str = "cpu",
) -> None:
    """Many images, few labels: labeled QAT on a small labeled fraction and on every label
    against label-free SQAKD on every image, at W4A4 and W2A2, on Fashion-MNIST."""
    from .demo import run_demo

    run_demo(output, data, teacher_epochs, steps, labeled_fraction, limit, overwrite, device)


@app.command()
@one_line_errors
def bench(
    family: Annotated[
        Path, typer.Option(help="a recipe family, e.g. configs/cifar10_resnet20.yaml")
    ],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="results folder")] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="QAT epochs per cell (default: the recipe's; PTQ cells stay at 0)"),
    ] = None,
    teacher_epochs: Annotated[
        int | None, typer.Option(help="teacher epochs (default: the recipe's)")
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="a trained teacher's model.safetensors")
    ] = None,
    cells: Annotated[
        list[str] | None, typer.Option(help="cell names or patterns, e.g. '*_w4a4_*' (repeatable)")
    ] = None,
    limit_train: Annotated[
        int | None, typer.Option(help="train each cell on this many random images")
    ] = None,
    teacher_limit_train: Annotated[
        int | None, typer.Option(help="train the teacher on this many images")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="the data folder (default: the recipe's data.root)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto")] = None,
    set: SetOption = None,
    teacher_set: Annotated[
        list[str] | None, typer.Option(help="override for the teacher only (repeatable)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="run every selected cell again, even if done")
    ] = False,
    list_cells: Annotated[
        bool, typer.Option("--list", help="print the family's cells and exit")
    ] = False,
) -> None:
    """Run a recipe family: teacher, every cell (skipping finished ones), results.md/.csv/.png."""
    from .bench import family_overview, load_family, results_markdown, run_bench

    recipe = load_family(family)
    if list_cells:
        typer.echo(family_overview(recipe))
        return
    result = run_bench(
        recipe, output or Path("runs/bench") / recipe.name, epochs=epochs,
        teacher_epochs=teacher_epochs, teacher=teacher, cells=cells, limit_train=limit_train,
        teacher_limit_train=teacher_limit_train, data=data, device=device, overrides=set,
        teacher_overrides=teacher_set, overwrite=overwrite,
    )  # fmt: skip
    typer.echo("\n" + results_markdown(result.family, result.teacher, result.rows))
    typer.echo(f"wrote {', '.join(str(path) for path in result.files.values())}")


@app.command()
@one_line_errors
def generate(
    run: Annotated[Path, typer.Option(help="the folder of a data-free run (akt, adadfq, gdfq)")],
    per_class: Annotated[int, typer.Option(help="images per class (one row per class)")] = 8,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="PNG to write (RUN/generated.png)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the latent vectors")] = 0,
) -> None:
    """Write a grid of generated images, one row per class, from a run's saved generator."""
    import torch
    from PIL import Image

    from .engine import safe_torch_load
    from .zeroshot import ConditionalGenerator, class_grid

    checkpoint = run / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint} not found; give the folder of a data-free run (--run)")
    config = _config(run / "config.yaml", None)
    prefix = "generator."
    method_state = safe_torch_load(checkpoint).get("method", {})
    state = {k[len(prefix) :]: v for k, v in method_state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"the run in {run} ({config.method.name}) has no generator")
    resize = tuple(config.data.resize) if config.data.resize else None
    generator = ConditionalGenerator.from_state_dict(state, resize)
    if config.data.mean is None or config.data.std is None:
        raise ValueError(f"{run / 'config.yaml'} records no data.mean/data.std to show images")
    torch.manual_seed(seed)
    grid = class_grid(generator, per_class, config.data.mean, config.data.std)
    output = output or run / "generated.png"
    array = grid.numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(output)
    typer.echo(f"wrote {output} ({generator.num_classes} classes x {per_class} images)")


@app.command("methods")
def list_methods() -> None:
    """List the registered quantizers, observers, methods, distillation losses, models and data
    formats."""
    from . import data, models
    from .distill import available_losses
    from .methods import available_methods
    from .quant import available_quantizers
    from .quant.observers import available_observers

    typer.echo(f"quantizers: {', '.join(available_quantizers())}")
    typer.echo(f"observers:  {', '.join(available_observers())}")
    typer.echo(f"methods:    {', '.join(available_methods())}")
    typer.echo(f"losses:     {', '.join(available_losses())}")
    typer.echo(f"models:     {', '.join(models.available_models())}")
    typer.echo(f"data:       {', '.join(data.available_formats())}")


def main() -> None:
    """Console entry point."""
    app(prog_name="sqakd")


if __name__ == "__main__":
    sys.exit(main())
