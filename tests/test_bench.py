"""The bench harness: a family expands into the right cells and configurations, bad recipes and
missing data stop with one clear line, and a tiny real run writes its table, CSV and plot and
skips finished cells when run again."""

from __future__ import annotations

import csv
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sqakd import bench
from sqakd.bench import (
    BenchRow,
    Budget,
    cell_config,
    cell_variant,
    expand_cells,
    expand_env,
    load_family,
    parse_bits,
    require_data,
    results_markdown,
    run_bench,
    select_cells,
    teacher_config,
    write_csv,
)
from sqakd.cli import app

REPO = Path(__file__).resolve().parents[1]
RESNET20_FAMILY = REPO / "configs" / "cifar10_resnet20.yaml"
CIFAR10_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 6, "test": 3}


def write_family(path: Path, cells: str, extra: str = "") -> Path:
    path.write_text(
        textwrap.dedent(
            """\
            family: toy
            title: Toy
            dataset: {name: Toy data, image_size: 32, expects: class folders, hint: make some}
            base:
              data: {format: folder, root: "${SQAKD_TEST_DATA:-/nowhere}/toy", batch_size: 8}
              model: {name: resnet20, num_classes: 10}
              method: {alpha: 1.0}
              train: {epochs: 50, weights: {name: adam, lr: 0.001}}
            teacher:
              train: {epochs: 70, weights: {name: sgd, lr: 0.1}}
            """
        )
        + extra
        + "cells:\n"
        + textwrap.indent(textwrap.dedent(cells), "  ")
    )
    return path


# ------------------------------------------------------------------------------ expanding cells
def test_a_group_expands_to_the_product_of_quantizers_bits_and_methods() -> None:
    cells = expand_cells(
        [{"quantizers": ["ewgs", "lsq"], "bits": [2, "W4A8"], "methods": ["qat", "sqakd"]}]
    )
    assert [c.name for c in cells] == [
        "ewgs_w2a2_qat", "ewgs_w2a2_sqakd", "ewgs_w4a8_qat", "ewgs_w4a8_sqakd",
        "lsq_w2a2_qat", "lsq_w2a2_sqakd", "lsq_w4a8_qat", "lsq_w4a8_sqakd",
    ]  # fmt: skip
    assert (cells[2].weight_bits, cells[2].act_bits, cells[2].bits) == (4, 8, "W4A8")


def test_group_settings_are_nested_and_attached_to_that_group_only() -> None:
    cells = expand_cells(
        [
            {"quantizers": ["ewgs"], "bits": [4], "methods": ["qat"]},
            {
                "quantizers": ["ewgs"],
                "bits": [4],
                "methods": ["sqakd"],
                "set": {"method.alpha": 100.0, "train": {"weights.lr": 0.5}},
            },
        ]
    )
    assert cells[0].settings == {}
    assert cells[1].settings == {"method": {"alpha": 100.0}, "train": {"weights": {"lr": 0.5}}}


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([{"quantizers": ["nope"], "bits": [4], "methods": ["qat"]}], "unknown quantizer 'nope'"),
        ([{"quantizers": ["ewgs"], "bits": [4], "methods": ["kd"]}], "unknown method 'kd'"),
        ([{"quantizers": ["ewgs"], "bits": [4]}], "has no methods"),
        (
            [{"quantizers": ["ewgs"], "bits": [4], "methods": ["qat"], "sets": {}}],
            "did you mean 'set'",
        ),
        ([{"quantizers": ["ewgs"], "bits": [4, 4], "methods": ["qat"]}], "listed twice"),
        ([{"quantizers": ["ewgs"], "bits": ["4bit"], "methods": ["qat"]}], "'W2A4'"),
        ([], "non-empty list"),
    ],
)
def test_bad_cell_groups_are_named_in_one_line(groups: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_cells(groups)


def test_bits_accept_a_number_or_a_label() -> None:
    assert parse_bits(3) == (3, 3)
    assert parse_bits("w2a4") == (2, 4)
    with pytest.raises(ValueError):
        parse_bits(True)


def test_environment_references_use_the_variable_or_the_default(monkeypatch) -> None:
    monkeypatch.setenv("SQAKD_TEST_DATA", "/data")
    assert expand_env("${SQAKD_TEST_DATA:-../x}/cifar10") == "/data/cifar10"
    monkeypatch.delenv("SQAKD_TEST_DATA")
    assert expand_env("${SQAKD_TEST_DATA:-../x}/cifar10") == "../x/cifar10"
    with pytest.raises(ValueError, match="SQAKD_TEST_DATA is not set"):
        expand_env("${SQAKD_TEST_DATA}/cifar10")


def test_cells_are_selected_by_pattern_and_an_unmatched_pattern_lists_the_cells() -> None:
    cells = expand_cells([{"quantizers": ["ewgs", "lsq"], "bits": [2, 4], "methods": ["qat"]}])
    chosen = select_cells(cells, ["*_w4a4_*", "ewgs_w2a2_qat"])
    assert [c.name for c in chosen] == ["ewgs_w2a2_qat", "ewgs_w4a4_qat", "lsq_w4a4_qat"]
    assert select_cells(cells, ["lsq_w2a2_qat,lsq_w4a4_qat"]) == cells[2:]
    assert select_cells(cells, None) == cells
    with pytest.raises(ValueError, match="lsq_w4a4_qat"):
        select_cells(cells, ["pact_*"])


# ------------------------------------------------------------------------------ configurations
def test_cell_configuration_layers_base_group_cell_budget_and_overrides(tmp_path: Path) -> None:
    family = load_family(
        write_family(
            tmp_path / "toy.yaml",
            """\
            - quantizers: [lsq]
              bits: [W2A4]
              methods: [sqakd]
              set: {method.alpha: 100.0, train.epochs: 60}
            """,
        )
    )
    (cell,) = family.cells
    config = cell_config(family, cell, tmp_path / "out", tmp_path / "t.safetensors")
    assert (config.quant.method, config.quant.weight_bits, config.quant.act_bits) == ("lsq", 2, 4)
    assert (config.method.name, config.method.alpha) == ("sqakd", 100.0)
    assert config.train.epochs == 60  # the group's setting beats base
    assert config.train.weights.name == "adam" and config.data.batch_size == 8
    assert config.run.output == tmp_path / "out" / "lsq_w2a4_sqakd"
    assert config.teacher.checkpoint == tmp_path / "t.safetensors"
    assert config.data.root == Path("/nowhere/toy")
    budget = Budget(
        epochs=3,
        limit_train=500,
        data=tmp_path / "d",
        overrides=["train.epochs=4", "method.alpha=2"],
    )
    config = cell_config(family, cell, tmp_path / "out", tmp_path / "t.safetensors", budget)
    assert config.data.limit_train == 500 and config.data.root == tmp_path / "d"
    assert config.train.epochs == 4 and config.method.alpha == 2.0  # --set wins over everything


def test_a_ptq_group_keeps_zero_epochs_under_the_epochs_budget(tmp_path: Path) -> None:
    family = load_family(
        write_family(
            tmp_path / "toy.yaml",
            """\
            - quantizers: [lsq]
              bits: [4]
              methods: [sqakd]
              set: {train.epochs: 0, quant.observer: mse}
              variant: ptq-mse
            - {quantizers: [lsq], bits: [4], methods: [sqakd]}
            """,
        )
    )
    ptq, trained = family.cells
    assert bench.is_ptq(ptq) and not bench.is_ptq(trained)
    budget = Budget(epochs=3)
    config = cell_config(family, ptq, tmp_path / "out", tmp_path / "t.safetensors", budget)
    assert config.train.epochs == 0 and config.quant.observer == "mse"
    assert config.run.output == tmp_path / "out" / "lsq_w4a4_sqakd_ptq-mse"
    config = cell_config(family, trained, tmp_path / "out", tmp_path / "t.safetensors", budget)
    assert config.train.epochs == 3 and config.quant.observer == "native"
    budget = Budget(epochs=3, overrides=["train.epochs=2"])  # --set still wins
    config = cell_config(family, ptq, tmp_path / "out", tmp_path / "t.safetensors", budget)
    assert config.train.epochs == 2


def test_a_method_override_reaches_only_the_cells_whose_method_has_it(tmp_path: Path) -> None:
    family = load_family(
        write_family(
            tmp_path / "toy.yaml", "- {quantizers: [lsq], bits: [2], methods: [qat, sqakd]}\n"
        )
    )
    qat, sqakd = family.cells
    budget = Budget(overrides=["method.temperature=2"])
    bench._check_method_overrides(family.cells, budget.overrides)  # sqakd has it: accepted
    config = cell_config(family, sqakd, tmp_path / "out", tmp_path / "t.safetensors", budget)
    assert config.method.temperature == 2.0
    config = cell_config(family, qat, tmp_path / "out", tmp_path / "t.safetensors", budget)
    assert config.method.name == "qat" and not hasattr(config.method, "temperature")
    assert teacher_config(family, tmp_path / "out", budget).method.name == "supervised"
    with pytest.raises(
        ValueError, match=r"-s method.temprature: no chosen cell's method \(qat, sqakd\)"
    ):
        bench._check_method_overrides(family.cells, ["method.temprature=2"])
    with pytest.raises(ValueError, match="no chosen cell's method"):
        bench._check_method_overrides([qat], budget.overrides)


def test_teacher_configuration_merges_the_teacher_section_over_base(tmp_path: Path) -> None:
    family = load_family(
        write_family(tmp_path / "toy.yaml", "- {quantizers: [ewgs], bits: [4], methods: [qat]}\n")
    )
    config = teacher_config(family, tmp_path / "out")
    assert config.train.epochs == 70 and config.train.weights.name == "sgd"
    assert config.train.weights.lr == 0.1 and config.data.batch_size == 8
    assert config.run.output == tmp_path / "out" / "teacher"
    budget = Budget(
        teacher_epochs=2, teacher_limit_train=64, teacher_overrides=["data.batch_size=4"]
    )
    config = teacher_config(family, tmp_path / "out", budget)
    assert (config.train.epochs, config.data.limit_train, config.data.batch_size) == (2, 64, 4)


def test_a_family_with_an_invalid_setting_fails_when_it_is_read(tmp_path: Path) -> None:
    path = write_family(
        tmp_path / "toy.yaml",
        "- {quantizers: [ewgs], bits: [4], methods: [qat], set: {train.epoch: 3}}\n",
    )
    with pytest.raises(ValueError, match="ewgs_w4a4_qat.*unknown config key 'train.epoch'"):
        load_family(path)
    with pytest.raises(ValueError, match="unknown key 'cell'"):
        load_family(write_family(tmp_path / "bad.yaml", "- {}\n", extra="cell: []\n"))


def test_missing_data_says_what_to_put_where(tmp_path: Path) -> None:
    family = load_family(
        write_family(tmp_path / "toy.yaml", "- {quantizers: [ewgs], bits: [4], methods: [qat]}\n")
    )
    config = cell_config(family, family.cells[0], tmp_path, tmp_path / "t")
    with pytest.raises(ValueError) as error:
        require_data(config, family.dataset)
    message = str(error.value)
    assert "\n" not in message
    assert "Toy data not found at /nowhere/toy" in message and "make some" in message
    (tmp_path / "toy" / "train").mkdir(parents=True)
    require_data(config.model_copy(update={"data": config.data.model_copy(update={"root": tmp_path / "toy"})}), family.dataset)  # fmt: skip


def test_the_tiny_imagenet_recipe_without_data_fails_in_one_line_through_the_cli(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "--family", str(REPO / "configs" / "tinyimagenet_resnet18.yaml"),
         "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: Tiny-ImageNet-200 not found at") and "val_annotations" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the table
def _row(**values) -> BenchRow:
    defaults = dict(
        family="toy", cell="ewgs_w4a4_sqakd", method="sqakd", quantizer="ewgs", bits="W4A4",
        weight_bits=4, act_bits=4, labels_used=False, epochs=3, train_images=None,
        top1_last=80.123, top1_best=80.5, best_epoch=2, val_top1=None, teacher_top1=81.0,
        minutes=1.25, images_per_second=812.4, run_dir="runs/x",
    )  # fmt: skip
    return BenchRow(**{**defaults, **values})


def test_markdown_and_csv_hold_every_column(tmp_path: Path) -> None:
    family = load_family(
        write_family(tmp_path / "toy.yaml", "- {quantizers: [ewgs], bits: [4], methods: [qat]}\n")
    )
    rows = [_row(), _row(cell="lsq_w2a2_qat", method="qat", quantizer="lsq", bits="W2A2",
                         weight_bits=2, act_bits=2, labels_used=True, train_images=500,
                         val_top1=70.0)]  # fmt: skip
    text = results_markdown(family, None, rows)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | quantizer | bits | labels used | epochs |")
    assert (
        lines[1]
        == "| SQAKD (no labels) | ewgs | W4A4 | no | 3 |  | 80.12 | 80.50 | — | 81.00 | 1.2 | 812 |"
    )
    assert (
        lines[2]
        == "| QAT (CE, labels) | lsq | W2A2 | yes | 3 | 500 | 80.12 | 80.50 | 70.00 | 81.00 | 1.2 | 812 |"
    )
    write_csv(rows, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(bench.CSV_COLUMNS)
    assert table[0]["val_top1"] == "" and table[1]["val_top1"] == "70.0"
    assert table[1]["labels_used"] == "True" and float(table[0]["top1_last"]) == 80.123


# ------------------------------------------------------------------------------ a real tiny run
@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/ (6 per class) and test/<class>/ (3 per class) of real CIFAR-10 JPEGs."""
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


@pytest.mark.slow  # trains a teacher and two students for one step each
def test_a_family_runs_end_to_end_and_a_rerun_skips_finished_cells(
    tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "bench"
    options = dict(
        epochs=1, teacher_epochs=1, data=tiny_tree, progress=False,
        cells=["ewgs_w4a4_*"],
        overrides=["data.batch_size=30", "data.eval_batch_size=30", f"data.cache_dir={tmp_path / 'cache'}"],
    )  # fmt: skip
    result = run_bench(RESNET20_FAMILY, output, **options)

    assert [row.cell for row in result.rows] == ["ewgs_w4a4_qat", "ewgs_w4a4_sqakd"]
    qat, sqakd = result.rows
    assert (qat.labels_used, sqakd.labels_used) == (True, False)
    assert qat.epochs == sqakd.epochs == 1 and qat.bits == "W4A4" and qat.quantizer == "ewgs"
    teacher = result.teacher
    assert teacher is not None and teacher.bits == "float"
    for row in result.rows:  # each cell measured the teacher it was given on the same test set
        assert row.teacher_top1 == pytest.approx(teacher.top1_last)
        assert 0.0 <= row.top1_last <= 100.0 and row.images_per_second > 0
        assert (Path(row.run_dir) / "summary.json").is_file()
    saved = yaml.safe_load((output / "ewgs_w4a4_sqakd" / "config.yaml").read_text())
    assert saved["teacher"]["checkpoint"] == str(output / "teacher" / "model.safetensors")
    assert saved["train"]["weights"] == {**saved["train"]["weights"], "name": "adam", "lr": 0.001}

    markdown = (output / "results.md").read_text()
    assert "CIFAR-10 (JPEG copy)" in markdown
    assert "| SQAKD (no labels) | ewgs | W4A4 | no | 1 |" in markdown
    assert "| QAT (CE, labels) | ewgs | W4A4 | yes | 1 |" in markdown
    with (output / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["cell"] for r in table] == ["teacher", "ewgs_w4a4_qat", "ewgs_w4a4_sqakd"]
    assert float(table[2]["top1_last"]) == pytest.approx(sqakd.top1_last)
    assert (output / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun trains nothing: the teacher and both cells are read back from their folders
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("sqakd.pipeline.train_teacher", refuse)
    monkeypatch.setattr("sqakd.pipeline.quantize", refuse)
    stamp = (output / "ewgs_w4a4_sqakd" / "summary.json").stat().st_mtime_ns
    again = run_bench(RESNET20_FAMILY, output, **options)
    assert [r.top1_last for r in again.rows] == [r.top1_last for r in result.rows]
    assert (output / "ewgs_w4a4_sqakd" / "summary.json").stat().st_mtime_ns == stamp

    # a rerun with another budget is refused rather than mixed into the same table
    with pytest.raises(ValueError, match=r"train.epochs was 1, now 2"):
        run_bench(RESNET20_FAMILY, output, **{**options, "epochs": 2})


def test_a_variant_names_its_cells_and_labels_its_rows(tmp_path: Path) -> None:
    family = load_family(
        write_family(
            tmp_path / "toy.yaml",
            "- {quantizers: [ewgs], bits: [4], methods: [sqakd, faqd]}\n"
            "- {quantizers: [ewgs], bits: [4], methods: [faqd], set: {method.affinity: ffa}, "
            "variant: ffa}\n",
        )
    )
    names = [cell.name for cell in family.cells]
    assert names == ["ewgs_w4a4_sqakd", "ewgs_w4a4_faqd", "ewgs_w4a4_faqd_ffa"]
    configs = {
        c.name: cell_config(family, c, tmp_path, tmp_path / "t.safetensors") for c in family.cells
    }
    assert configs["ewgs_w4a4_faqd_ffa"].method.options["affinity"] == "ffa"
    assert configs["ewgs_w4a4_faqd"].method.options["affinity"] == "fa"
    assert "alpha" not in configs["ewgs_w4a4_faqd"].method.options  # SQAKD's key stays with SQAKD
    assert cell_variant("ewgs_w4a4_faqd_ffa", "faqd") == "ffa"
    assert cell_variant("ewgs_w4a4_faqd", "faqd") == ""
    with pytest.raises(ValueError, match="variant 'F F' must be a short name"):
        load_family(write_family(tmp_path / "bad.yaml",
                                 "- {quantizers: [ewgs], bits: [4], methods: [faqd], variant: F F}\n"))  # fmt: skip
