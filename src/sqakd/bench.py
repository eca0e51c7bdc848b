"""``sqakd bench``: run one recipe family (``configs/*.yaml``) end to end and tabulate it.

family YAML -> :class:`Family` (shared settings, teacher settings, a list of cells)
  -> teacher: the checkpoint given, else one already trained in ``OUTPUT/teacher``, else train it
  -> every cell: ``OUTPUT/<cell>/summary.json`` present ? read it : :func:`sqakd.pipeline.quantize`
  -> ``OUTPUT/results.md``, ``results.csv`` and ``results.png`` (top-1 against bit-width)

A cell is one (quantizer, bit-width, method) triple; its configuration is, in order of precedence
(later wins): the family's ``base`` -> the cell group's ``set`` -> the cell itself (quantizer,
bits, method, teacher, run folder) -> the budget options (epochs, images, data root, device;
a group that sets ``train.epochs: 0``, post-training quantization, keeps it) -> the caller's
``key=value`` overrides. The format is documented in ``configs/README.md``.
"""

from __future__ import annotations

import copy
import csv
import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .config import Config, merge, parse_override, read_yaml, set_dotted, validate_config
from .methods import method_class

FAMILY_KEYS = ("family", "title", "source", "dataset", "base", "teacher", "cells")
GROUP_KEYS = ("quantizers", "bits", "methods", "set", "variant")
DATASET_KEYS = ("name", "image_size", "expects", "hint")
TEACHER_FOLDER = "teacher"
CSV_COLUMNS = (
    "family", "cell", "method", "quantizer", "bits", "weight_bits", "act_bits", "labels_used",
    "epochs", "train_images", "top1_last", "top1_best", "best_epoch", "val_top1", "teacher_top1",
    "minutes", "images_per_second", "run_dir",
)  # fmt: skip

_ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
_BITS_LABEL = re.compile(r"^[wW](\d+)[aA](\d+)$")


# ------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class DatasetSpec:
    """What data a family expects and, when it is missing, how to get it."""

    name: str
    image_size: int | None = None
    expects: str = ""
    hint: str = ""


@dataclass(frozen=True)
class Cell:
    """One run of a family: a quantizer at a bit-width trained by a method (``qat``/``sqakd``)."""

    name: str
    quantizer: str
    weight_bits: int
    act_bits: int
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"


@dataclass
class Family:
    """A parsed recipe family: settings shared by every run, the teacher's, and the cells."""

    name: str
    title: str
    source: str
    dataset: DatasetSpec
    base: dict[str, Any]
    teacher: dict[str, Any]
    cells: list[Cell]
    path: Path | None = None


def expand_env(text: str) -> str:
    """``${VAR}`` -> the variable's value; ``${VAR:-default}`` -> its value or ``default``."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is None:
            raise ValueError(
                f"environment variable {name} is not set (used in {text!r}); set it or give a default "
                f"as ${{{name}:-value}}"
            )
        return default

    return _ENV_REFERENCE.sub(replace, text)


def _expand_tree(value: Any) -> Any:
    if isinstance(value, str):
        return expand_env(value)
    if isinstance(value, dict):
        return {key: _expand_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_tree(item) for item in value]
    return value


def _check_keys(mapping: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
            )
            raise ValueError(f"unknown key {key!r} in {where}{hint}")


def _as_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of key: value, got {value!r}")
    return value


def method_label(name: str) -> str:
    """A method's display name (its class's ``label``), or its registry name."""
    try:
        return method_class(name).label or name
    except ValueError:
        return name


def _method_options(name: str) -> set[str] | None:
    """The option names of method ``name``, or ``None`` for a method no one registered."""
    try:
        return set(method_class(name).Options.model_fields)
    except ValueError:
        return None


def _only_options_of(tree: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``method`` section with only the keys the chosen method has: a family's
    ``base`` is shared by several methods (SQAKD's temperature means nothing to labeled QAT)."""
    section = tree.get("method")
    if not isinstance(section, dict) or "name" not in section:
        return tree
    known = _method_options(str(section["name"]))
    if known is None:  # an unknown method: validation names it
        return tree
    kept = {k: v for k, v in section.items() if k == "name" or k in known}
    return {**tree, "method": kept}


def _nested(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"method.alpha": 100}`` (dotted keys, or nested mappings) -> ``{"method": {"alpha": 100}}``."""
    tree: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            value = _nested(value)
        single: dict[str, Any] = {}
        set_dotted(single, str(key), value)
        tree = merge(tree, single)
    return tree


def parse_bits(value: Any) -> tuple[int, int]:
    """``4`` -> ``(4, 4)``; ``"W2A4"`` -> ``(2, 4)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    match = _BITS_LABEL.match(str(value).strip())
    if match is None:
        raise ValueError(
            f"bits entry {value!r} must be a whole number (same for weights and activations) or 'W2A4'"
        )
    return int(match.group(1)), int(match.group(2))


def cell_name(
    quantizer: str, weight_bits: int, act_bits: int, method: str, variant: str = ""
) -> str:
    """The cell's folder name, e.g. ``ewgs_w4a4_sqakd`` (``lsq+`` becomes ``lsqplus``), or
    ``ewgs_w4a4_faqd_ffa`` for a group with ``variant: ffa`` (one method with other options)."""
    name = f"{quantizer.replace('+', 'plus')}_w{weight_bits}a{act_bits}_{method}"
    return f"{name}_{variant}" if variant else name


def cell_variant(cell: str, method: str) -> str:
    """The ``variant`` part of a cell name (``""`` when there is none)."""
    head, marker, tail = cell.rpartition(f"_{method}_")
    return tail if marker and head else ""


def expand_cells(groups: Any) -> list[Cell]:
    """The ``cells:`` list of a family: each group is ``quantizers`` x ``bits`` x ``methods``."""
    from .methods import available_methods
    from .quant import available_quantizers

    if not isinstance(groups, list) or not groups:
        raise ValueError("cells must be a non-empty list of groups (quantizers:, bits:, methods:)")
    cells: dict[str, Cell] = {}
    for index, group in enumerate(groups, start=1):
        where = f"cells group {index}"
        group = _as_mapping(group, where)
        _check_keys(group, GROUP_KEYS, where)
        missing = [key for key in ("quantizers", "bits", "methods") if not group.get(key)]
        if missing:
            raise ValueError(f"{where} has no {', '.join(missing)}; give each as a list")
        settings = _nested(_as_mapping(group.get("set"), f"{where} set"))
        variant = str(group.get("variant") or "")
        if variant and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", variant):
            raise ValueError(
                f"{where}: variant {variant!r} must be a short name of lower-case letters, digits "
                "and dashes (it ends the cell's folder name)"
            )
        for key, values in (
            ("quantizers", available_quantizers()),
            ("methods", available_methods()),
        ):
            for name in group[key]:
                if name not in values:
                    raise ValueError(
                        f"{where}: unknown {key[:-1]} {name!r}; choose one of: {', '.join(values)}"
                    )
        for quantizer in group["quantizers"]:
            for bits in group["bits"]:
                weight_bits, act_bits = parse_bits(bits)
                for method in group["methods"]:
                    name = cell_name(quantizer, weight_bits, act_bits, method, variant)
                    if name in cells:
                        raise ValueError(
                            f"cell {name} is listed twice (again in {where}); list each cell once"
                        )
                    cells[name] = Cell(name, quantizer, weight_bits, act_bits, method, settings)
    return list(cells.values())


def _dataset_spec(dataset: dict[str, Any]) -> DatasetSpec:
    size = dataset.get("image_size")
    if size is not None and not (isinstance(size, int) and size > 0):
        raise ValueError(f"dataset.image_size must be a positive whole number, got {size!r}")
    text = {k: str(v) for k, v in dataset.items() if k != "image_size"}
    return DatasetSpec(**{"name": "the data", **text, "image_size": size})


def load_family(path: str | Path) -> Family:
    """Read and check a family YAML (see ``configs/README.md``); every cell's config validates."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"family file {path} does not exist; give a YAML file from configs/")
    raw = read_yaml(path.read_text(errors="replace"), f"family file {path}") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"family file {path} must hold a mapping (family:, base:, cells: ...)")
    _check_keys(raw, FAMILY_KEYS, str(path))
    dataset = _as_mapping(raw.get("dataset"), "dataset")
    _check_keys(dataset, DATASET_KEYS, f"{path} dataset")
    family = Family(
        name=str(raw.get("family") or path.stem),
        title=str(raw.get("title") or path.stem),
        source=str(raw.get("source") or ""),
        dataset=_dataset_spec(dataset),
        base=_as_mapping(raw.get("base"), "base"),
        teacher=_as_mapping(raw.get("teacher"), "teacher"),
        cells=expand_cells(raw.get("cells")),
        path=path,
    )
    for cell in family.cells:  # fail now, not after the teacher has trained for an hour
        try:
            cell_config(family, cell, Path("runs/check"), Path("teacher.safetensors"))
        except ValueError as error:
            raise ValueError(f"{path}, cell {cell.name}: {error}") from None
    return family


def select_cells(cells: Sequence[Cell], patterns: Iterable[str] | None) -> list[Cell]:
    """The cells whose name matches any pattern (``fnmatch``, comma-separated lists allowed)."""
    wanted = [p.strip() for text in patterns or [] for p in text.split(",") if p.strip()]
    if not wanted:
        return list(cells)
    for pattern in wanted:
        if not any(fnmatchcase(cell.name, pattern) for cell in cells):
            raise ValueError(
                f"no cell matches {pattern!r}; the family's cells are: "
                f"{', '.join(cell.name for cell in cells)}"
            )
    return [cell for cell in cells if any(fnmatchcase(cell.name, p) for p in wanted)]


# ------------------------------------------------------------------------------------ configs
@dataclass
class Budget:
    """What the caller changes for every run of the bench (``None``: keep the recipe's value)."""

    epochs: int | None = None
    teacher_epochs: int | None = None
    limit_train: int | None = None
    teacher_limit_train: int | None = None
    data: Path | None = None
    device: str | None = None
    progress: bool | None = None
    overrides: list[str] = field(default_factory=list)
    teacher_overrides: list[str] = field(default_factory=list)


def _build(tree: dict[str, Any], overrides: Sequence[str]) -> Config:
    """Apply the caller's overrides, then keep the method keys the run's method has (a
    ``-s method.X`` meant for other cells' methods does not reach this one), then validate."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return validate_config(_only_options_of(tree))


def _budget_tree(budget: Budget, epochs: int | None, limit: int | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if epochs is not None:
        settings["train.epochs"] = epochs
    if limit is not None:
        settings["data.limit_train"] = limit
    if budget.data is not None:
        settings["data.root"] = str(budget.data)
    if budget.device is not None:
        settings["run.device"] = budget.device
    if budget.progress is not None:
        settings["run.progress"] = budget.progress
    return _nested(settings)


def teacher_config(family: Family, output: Path, budget: Budget | None = None) -> Config:
    """The full-precision teacher's run: ``base`` + the family's ``teacher`` section."""
    budget = budget or Budget()
    tree = merge(_expand_tree(family.base), _expand_tree(family.teacher))
    # the method train_teacher runs, so that a rerun recognises the teacher's folder as done
    identity = {"run.output": str(output / TEACHER_FOLDER), "method.name": "supervised"}
    tree = merge(tree, _nested(identity))
    tree = merge(tree, _budget_tree(budget, budget.teacher_epochs, budget.teacher_limit_train))
    return _build(tree, [*budget.overrides, *budget.teacher_overrides])


def cell_config(
    family: Family,
    cell: Cell,
    output: Path,
    teacher_checkpoint: Path,
    budget: Budget | None = None,
) -> Config:
    """One cell's full run configuration (see the module docstring for the precedence)."""
    budget = budget or Budget()
    tree = merge(_expand_tree(family.base), _expand_tree(cell.settings))
    identity = {
        "quant.method": cell.quantizer,
        "quant.weight_bits": cell.weight_bits,
        "quant.act_bits": cell.act_bits,
        "method.name": cell.method,
        "teacher.checkpoint": str(teacher_checkpoint),
        "run.output": str(output / cell.name),
    }
    tree = merge(tree, _nested(identity))
    epochs = None if is_ptq(cell) else budget.epochs
    tree = merge(tree, _budget_tree(budget, epochs, budget.limit_train))
    return _build(tree, budget.overrides)


def is_ptq(cell: Cell) -> bool:
    """Whether the cell's group sets ``train.epochs: 0`` (post-training quantization: calibrate
    and evaluate): the bench's ``--epochs`` budget leaves such a cell at 0 (``--set`` does not)."""
    return cell.settings.get("train", {}).get("epochs") == 0


def _check_method_overrides(cells: Sequence[Cell], overrides: Sequence[str]) -> None:
    """A ``-s method.X=...`` applies to the cells whose method has option X; one that no chosen
    cell's method has is a typo or the wrong cells, refused instead of silently dropped."""
    options: set[str] = set()
    for cell in cells:
        options |= _method_options(cell.method) or set()
    for text in overrides:
        key, _ = parse_override(text)
        parts = key.split(".")
        if (
            parts[0] == "method"
            and len(parts) > 1
            and parts[1] != "name"
            and parts[1] not in options
        ):
            methods = sorted({cell.method for cell in cells})
            raise ValueError(
                f"-s {key}: no chosen cell's method ({', '.join(methods)}) has option "
                f"{parts[1]!r}; check the key or choose cells with --cells"
            )


def require_data(config: Config, dataset: DatasetSpec) -> None:
    """A one-line error saying where to put the data when the family's data set is missing."""
    data = config.data
    root = data.root
    needed = root / data.train_split if root is not None and data.format == "folder" else root
    if root is not None and needed is not None and needed.exists():
        return
    where = root if root is not None else "data.root (not set)"
    expects = f" ({dataset.expects})" if dataset.expects else ""
    hint = f": {dataset.hint}" if dataset.hint else ""
    raise ValueError(
        f"{dataset.name} not found at {where}{expects}; put it there{hint}; or point to it with "
        "--data PATH or the SQAKD_DATA variable (the folder that holds it)"
    )


# ------------------------------------------------------------------------------------ results
@dataclass
class BenchRow:
    """One line of the results table (accuracies in percent; ``None`` when not measured)."""

    family: str
    cell: str
    method: str
    quantizer: str
    bits: str
    weight_bits: int | None
    act_bits: int | None
    labels_used: bool
    epochs: int
    train_images: int | None
    top1_last: float | None
    top1_best: float | None
    best_epoch: int
    val_top1: float | None
    teacher_top1: float | None
    minutes: float
    images_per_second: float
    run_dir: str


@dataclass
class BenchResult:
    """What :func:`run_bench` produced: the teacher's row (when trained here), every cell's row,
    and the files written."""

    family: Family
    teacher: BenchRow | None
    rows: list[BenchRow]
    files: dict[str, Path]


def _quantizer_label(config: Config) -> str:
    policy = config.quant
    weights, acts = policy.weight_method or policy.method, policy.act_method or policy.method
    return weights if weights == acts else f"{weights}/{acts}"


def read_config_file(path: Path) -> Any:
    """A run folder's config.yaml as a plain tree (bounded YAML: a folder may come from elsewhere)."""
    return read_yaml(path.read_text(errors="replace"), str(path)) or {}


def read_row(family: str, folder: Path, cell: str | None = None) -> BenchRow:
    """A table row from a finished run folder (its ``summary.json`` and ``config.yaml``)."""
    summary = json.loads((folder / "summary.json").read_text())
    config = validate_config(read_config_file(folder / "config.yaml"))
    quantized = summary.get("weight_bits") is not None
    train_images = summary.get("train_images", config.data.limit_train)
    return BenchRow(
        family=family,
        cell=cell or folder.name,
        method=summary["method"],
        quantizer=_quantizer_label(config) if quantized else "float",
        bits=f"W{summary['weight_bits']}A{summary['act_bits']}" if quantized else "float",
        weight_bits=summary.get("weight_bits"),
        act_bits=summary.get("act_bits"),
        labels_used=bool(summary.get("labels_used")),
        epochs=int(summary.get("epochs", config.train.epochs)),
        train_images=train_images,
        top1_last=summary.get("last", {}).get("top1"),
        top1_best=summary.get("best", {}).get("top1"),
        best_epoch=int(summary.get("best_epoch", 0)),
        val_top1=summary.get("validation", {}).get("top1"),
        teacher_top1=summary.get("teacher", {}).get("top1"),
        minutes=float(summary.get("minutes", 0.0)),
        images_per_second=float(summary.get("images_per_second", 0.0)),
        run_dir=str(folder),
    )


def _variant_label(row: BenchRow) -> str:
    variant = cell_variant(row.cell, row.method)
    return f" [{variant}]" if variant else ""


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_markdown(family: Family, teacher: BenchRow | None, rows: Sequence[BenchRow]) -> str:
    """The results table as Markdown, with the data set, source and teacher above it."""
    lines = [f"# {family.title}", ""]
    lines.append(f"Data: {family.dataset.name}. Recipe family `{family.name}`" + (
        f" (from {family.source})." if family.source else "."
    ))  # fmt: skip
    if teacher is not None:
        lines.append(
            f"Teacher (float): top-1 {_number(teacher.top1_last)} % after {teacher.epochs} epochs "
            f"({teacher.minutes:.1f} min, {teacher.images_per_second:.0f} images/s)."
        )
    lines += [
        "Top-1 in percent on the test split; *best* is the best epoch by test accuracy (by "
        "validation accuracy when data.val_fraction > 0); *train images* is all when empty.",
        "",
        "| method | quantizer | bits | labels used | epochs | train images | top-1 last | "
        "top-1 best | val top-1 | teacher top-1 | minutes | images/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {method_label(row.method)}{_variant_label(row)} | {row.quantizer} | {row.bits} | "
            f"{'yes' if row.labels_used else 'no'} | {row.epochs} | {row.train_images or ''} | "
            f"{_number(row.top1_last)} | {_number(row.top1_best)} | {_number(row.val_top1)} | "
            f"{_number(row.teacher_top1)} | {row.minutes:.1f} | {row.images_per_second:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[BenchRow], path: Path) -> None:
    """Every row with every column of :data:`CSV_COLUMNS` (empty where not measured)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            writer.writerow({k: "" if values[k] is None else values[k] for k in CSV_COLUMNS})


def plot_results(
    family: Family, teacher_top1: float | None, rows: Sequence[BenchRow], path: Path
) -> None:
    """Top-1 (last epoch) against weight bit-width; one line per method x quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str, str], list[BenchRow]] = {}
    for row in rows:
        if row.weight_bits is not None and row.top1_last is not None:
            key = (row.method, cell_variant(row.cell, row.method), row.quantizer)
            lines.setdefault(key, []).append(row)
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for (method, _, quantizer), points in sorted(lines.items()):
        points.sort(key=lambda r: r.weight_bits or 0)
        axis.plot(
            [p.weight_bits for p in points],
            [p.top1_last for p in points],
            marker="o",
            linestyle="--" if points[0].labels_used else "-",  # label-free methods solid
            label=f"{method_label(method)}{_variant_label(points[0])} + {quantizer}",
        )
    if teacher_top1 is not None:
        axis.axhline(teacher_top1, color="black", linestyle=":", label="teacher (float)")
    ticks = sorted({r.weight_bits for r in rows if r.weight_bits is not None})
    labels = {r.weight_bits: r.bits for r in rows if r.weight_bits is not None}
    axis.set_xticks(ticks, [labels[t] for t in ticks])
    axis.set(
        xlabel="bit-width", ylabel="top-1 (%)", title=f"{family.title} ({family.dataset.name})"
    )
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(
    family: Family, teacher: BenchRow | None, rows: Sequence[BenchRow], output: Path
) -> dict[str, Path]:
    """``results.md``, ``results.csv`` (teacher first when known) and ``results.png``."""
    output.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": output / "results.md",
        "csv": output / "results.csv",
        "plot": output / "results.png",
    }
    files["markdown"].write_text(results_markdown(family, teacher, rows))
    write_csv(([teacher] if teacher else []) + list(rows), files["csv"])
    known = [r.teacher_top1 for r in rows if r.teacher_top1 is not None]
    teacher_top1 = teacher.top1_last if teacher else (known[0] if known else None)
    plot_results(family, teacher_top1, rows, files["plot"])
    return files


# ------------------------------------------------------------------------------------ the run
#: settings that may differ between the first run of a cell and a rerun that reuses it
_RUN_ONLY = {"run": ("output", "overwrite", "device", "progress", "threads", "tensorboard")}


def _comparable(config: Config) -> dict[str, Any]:
    tree = config.model_dump(mode="json")
    for key in _RUN_ONLY["run"]:
        tree["run"].pop(key, None)
    tree["data"].pop("mean", None)  # filled in from the data by the run itself
    tree["data"].pop("std", None)
    tree["data"].pop("classes", None)
    tree["data"].pop("cache_dir", None)
    return tree


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix[:-1]} was {old!r}, now {new!r}"


def run_state(config: Config) -> str:
    """``"done"`` (summary.json present), ``"partial"`` (started, not finished) or ``"new"``.

    A folder holding a run of a different configuration raises: a rerun must never mix budgets
    in one table or resume a run under other settings.
    """
    folder = Path(config.run.output)
    if not (folder / "config.yaml").is_file():
        return "new"
    earlier = validate_config(read_config_file(folder / "config.yaml"))
    difference = _first_difference(_comparable(earlier), _comparable(config))
    if difference:
        raise ValueError(
            f"{folder} holds a run with other settings ({difference}); choose another --output, "
            "or pass --overwrite to run it again"
        )
    return "done" if (folder / "summary.json").is_file() else "partial"


def _train(job: Any, config: Config, state: str) -> None:
    """Run ``job`` (train_teacher or quantize): fresh, or continuing a partial run."""
    run = config.run.model_copy(update={"overwrite": True})
    job(config.model_copy(update={"run": run}), resume=state == "partial")


def _log(message: str) -> None:
    from .engine import get_logger

    get_logger().info(message)


def ensure_teacher(
    family: Family, output: Path, budget: Budget, teacher: Path | None, overwrite: bool
) -> tuple[Path, BenchRow | None]:
    """The teacher checkpoint to distil from, and its row when it was trained in ``output``."""
    from .pipeline import train_teacher

    if teacher is not None:
        if not Path(teacher).is_file():
            raise ValueError(
                f"teacher checkpoint {teacher} does not exist; give a .safetensors file"
            )
        return Path(teacher), None
    config = teacher_config(family, output, budget)
    require_data(config, family.dataset)
    folder = Path(config.run.output)
    checkpoint = folder / "model.safetensors"
    state = "new" if overwrite else run_state(config)
    if state == "done" and checkpoint.is_file():
        _log(f"reusing the teacher in {folder}")
    else:
        _log(f"training the float teacher ({config.train.epochs} epochs) in {folder}")
        _train(train_teacher, config, state)
    return checkpoint, read_row(family.name, folder, TEACHER_FOLDER)


def run_bench(
    family: str | Path | Family,
    output: str | Path,
    *,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    teacher: str | Path | None = None,
    cells: Iterable[str] | None = None,
    limit_train: int | None = None,
    teacher_limit_train: int | None = None,
    data: str | Path | None = None,
    device: str | None = None,
    overrides: Sequence[str] | None = None,
    teacher_overrides: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BenchResult:
    """Run a family: teacher (given, reused or trained), then every selected cell not yet done,
    then write results.md/.csv/.png into ``output``.

    ``epochs``/``teacher_epochs`` replace the recipe's (the paper's) epoch counts;
    ``limit_train``/``teacher_limit_train`` train on a random subset of that many images;
    ``overrides`` (``key=value``) apply to every run, ``teacher_overrides`` to the teacher only.
    """
    from .engine import setup_console_logging
    from .pipeline import quantize

    setup_console_logging()
    family = family if isinstance(family, Family) else load_family(family)
    output = Path(output)
    chosen = select_cells(family.cells, cells)
    budget = Budget(
        epochs=epochs,
        teacher_epochs=teacher_epochs,
        limit_train=limit_train,
        teacher_limit_train=teacher_limit_train,
        data=Path(data) if data is not None else None,
        device=device,
        progress=progress,
        overrides=list(overrides or []),
        teacher_overrides=list(teacher_overrides or []),
    )
    _check_method_overrides(chosen, budget.overrides)
    configs = {
        cell.name: cell_config(family, cell, output, Path("teacher"), budget) for cell in chosen
    }
    require_data(next(iter(configs.values())), family.dataset)
    checkpoint, teacher_row = ensure_teacher(
        family, output, budget, Path(teacher) if teacher else None, overwrite
    )
    rows = []
    for index, cell in enumerate(chosen, start=1):
        config = cell_config(family, cell, output, checkpoint, budget)
        folder = Path(config.run.output)
        state = "new" if overwrite else run_state(config)
        if state == "done":
            _log(f"[{index}/{len(chosen)}] {cell.name}: done earlier, reading {folder}")
        else:
            _log(f"[{index}/{len(chosen)}] {cell.name}: {config.train.epochs} epochs in {folder}")
            _train(quantize, config, state)
        rows.append(read_row(family.name, folder, cell.name))
        write_results(family, teacher_row, rows, output)  # a partial table survives a stop
    files = write_results(family, teacher_row, rows, output)
    return BenchResult(family, teacher_row, rows, files)


def family_overview(family: Family) -> str:
    """One line per cell: what ``sqakd bench --list`` prints."""
    lines = [f"{family.name}: {family.title} ({family.dataset.name}), {len(family.cells)} cells"]
    for cell in family.cells:
        extra = ", ".join(f"{k}={v}" for k, v in _flat(cell.settings).items())
        lines.append(f"  {cell.name}" + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
