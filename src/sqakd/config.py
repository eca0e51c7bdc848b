"""The typed run configuration: one YAML file (plus ``key=value`` overrides) describes a run.

Everything is validated once, here, at the edge: an unknown key, a wrong type or a value out of
range is reported with the key's dotted name and the fix, never as a traceback deep in training.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .quant.policy import QuantPolicy


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunConfig(Section):
    """Where the run's files go and how it runs."""

    output: Path = Path("runs/run")
    overwrite: bool = False
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = False
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = None
    sync_batchnorm: bool = False
    compile: bool | Literal["auto"] = "auto"
    channels_last: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and not value.startswith(("cpu", "cuda", "mps")):
            raise ValueError(
                f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {value!r}"
            )
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if not isinstance(value, bool) and value != "auto":
            raise ValueError(f"run.compile must be true, false or auto, got {value!r}")
        return value


class AugmentConfig(Section):
    crop_padding: int = Field(4, ge=0)
    flip: bool = True


class DataConfig(Section):
    """Which images to read and how to batch and augment them."""

    format: str = "folder"
    root: Path | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    test_format: str | None = None
    test_root: Path | None = None
    resize: tuple[int, int] | None = None
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    augment: AugmentConfig = AugmentConfig()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    cache_dir: Path | None = None


class ModelConfig(Section):
    """The architecture (a registered name or `package.module:function`)."""

    name: str = "resnet20"
    num_classes: int | None = None
    in_channels: int | None = None
    kwargs: dict[str, Any] = {}


class StudentConfig(Section):
    """The student's architecture when it is not the teacher's, trained from random initialisation.

    ``name: null`` (default): the student is a prepared copy of the teacher (``model.name``) and
    starts from its weights. A registered name or ``package.module:function`` (FAQD's released
    setting: a ResNet-110 teacher, a ResNet-20 student) builds that network with ``kwargs`` and
    ``model.num_classes``/``in_channels``, initialised from ``run.seed``."""

    name: str | None = None
    kwargs: dict[str, Any] = {}


class TeacherConfig(Section):
    """The full-precision teacher's weights; ``cache_outputs``: compute its logits once per
    training image and look them up every epoch (``None``: when data.augment is off)."""

    checkpoint: Path | None = None
    cache_outputs: bool | None = None
    #: renames checkpoint key prefixes before loading, e.g. ``{"linear.": "fc."}``
    key_map: dict[str, str] = {}
    #: ``shapes``: pair keys that do not match by name one to one in order by shape (logged)
    match: Literal["names", "shapes"] = "names"


class OptimizerConfig(Section):
    """One optimizer and its schedule (``betas`` only for adam and adamw, ``momentum`` and
    ``nesterov`` only for sgd)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)  # adam and adamw
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    step_milestones: list[int] = []
    step_gamma: float = 0.1


class TrainConfig(Section):
    """Epochs, one optimizer per parameter group (`optimizers.<group>` for a method's own), checkpoints.

    ``weights`` and ``quantizers`` configure the student's two groups; ``optimizers.<group>`` any
    other group a method has (a trainable teacher, adapters, a generator), falling back to the
    method's own default, else to ``weights``."""

    epochs: int = Field(1, ge=0)  # 0: calibrate and evaluate only (PTQ)
    weights: OptimizerConfig = OptimizerConfig(lr=1e-3, weight_decay=1e-4)
    quantizers: OptimizerConfig = OptimizerConfig(lr=1e-5, weight_decay=0.0)
    optimizers: dict[str, OptimizerConfig] = {}
    grad_clip: float | None = Field(None, gt=0)
    calibration_batches: int = Field(1, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    ewgs_delta_every_epochs: int | None = Field(None, ge=1)
    ewgs_delta_batches: int = Field(3, ge=1)

    @field_validator("optimizers")
    @classmethod
    def _no_student_groups(cls, value: dict[str, OptimizerConfig]) -> dict[str, OptimizerConfig]:
        for group in ("weights", "quantizers"):
            if group in value:
                raise ValueError(
                    f"set the {group} group with train.{group}, not train.optimizers.{group}"
                )
        return value

    def optimizer_for(self, group: str) -> OptimizerConfig | None:
        """The recipe's settings for ``group``, or ``None`` when it sets none."""
        if group in ("weights", "quantizers"):
            return getattr(self, group)
        return self.optimizers.get(group)


#: the method section's keys and defaults before the method contract (every method had them)
_PRE_CONTRACT_DEFAULTS: dict[str, Any] = {
    "temperature": 4.0, "alpha": 1.0, "gamma": 0.0, "beta": 0.0, "extra_loss": None, "options": {},
}  # fmt: skip
_NO_DEFAULT = object()


class MethodConfig(Section):
    """The training method (`name`) and, as further keys, that method's own typed options.

    Each method validates its keys (``sqakd.methods.available_methods()``), and an unknown one is
    refused with its name. After validation the extra keys hold every option with its resolved
    value."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = "sqakd"

    @model_validator(mode="before")
    @classmethod
    def _pre_contract_run_folders(cls, data: Any) -> Any:
        """Run folders written before the method contract (up to commit 55cf0d1) list SQAKD's
        keys and an empty ``options`` for every method; in such a dump (all six keys present),
        drop those that hold their old defaults where the method has no such option, so that
        ``sqakd eval --run OLD_RUN`` still works. A non-default value is kept, and refused by the
        method's own validation; a recipe that names a key of another method is refused too."""
        if not isinstance(data, dict) or not set(_PRE_CONTRACT_DEFAULTS) <= set(data):
            return data  # only a whole old dump (every key, "options" among them) is such a folder
        from .methods import method_class  # methods build on config: import when validating

        try:
            known = method_class(str(data.get("name", "sqakd"))).Options.model_fields
        except ValueError:  # an unknown method: validation names it
            return data
        return {
            key: value
            for key, value in data.items()
            if key in known or _PRE_CONTRACT_DEFAULTS.get(key, _NO_DEFAULT) != value
        }

    @model_validator(mode="after")
    def _typed_options(self) -> MethodConfig:
        from .methods import validate_options  # methods build on config: import when validating

        options = validate_options(self.name, self.__pydantic_extra__ or {})
        self.__pydantic_extra__ = options.model_dump(mode="json")
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The method's options (every key besides ``name``)."""
        return dict(self.__pydantic_extra__ or {})


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    quant: QuantPolicy = QuantPolicy()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"quant.weight_bits=2"`` -> ``("quant.weight_bits", 2)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(
            f"override {text!r} must look like key.sub=value, e.g. quant.weight_bits=2"
        )
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Read a YAML recipe (optional), apply ``key=value`` overrides, validate, return a Config."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; give the path to a YAML recipe")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"config file {path} must hold a mapping of sections (run:, data:, ...)"
            )
        tree = merge(tree, loaded)
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return validate_config(tree)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_config(tree: dict[str, Any]) -> Config:
    """Validate a plain dict; errors name the dotted key and, for typos, the closest valid key."""
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    messages = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            messages.append(f"unknown config key {location!r}{_suggest(item['loc'])}")
        elif item["type"] == "value_error":  # our validators' messages name the value
            message = str(item["msg"]).removeprefix("Value error, ")
            if message.startswith(("config key ", "unknown config key ")):  # method options
                messages.append(message)
            else:
                messages.append(f"config key {location!r}: {message}")
        else:
            messages.append(f"config key {location!r}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(messages)


def _suggest(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Config
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1)
    return (
        f"; did you mean {close[0]!r}?"
        if close
        else f"; valid keys: {', '.join(model.model_fields)}"
    )


def dump_config(config: Config) -> str:
    """The full, resolved configuration as YAML (written into every run folder)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_reference() -> str:
    """Markdown reference of every key with its type and default (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `sqakd/config.py` by `python -m sqakd.config > docs/configuration.md`",
        "(a test checks that this file matches the code). Set keys in a YAML recipe or with",
        "`-s section.key=value` on the command line.",
        "",
    ]
    for section_name, field in Config.model_fields.items():
        section = field.annotation
        doc = (section.__doc__ or "").strip().splitlines()[0] if section.__doc__ else ""
        lines += [f"## `{section_name}`", "", doc, "", "| key | type | default |", "|---|---|---|"]
        defaults = getattr(Config(), section_name).model_dump(mode="json")
        for key, sub in section.model_fields.items():
            lines.append(f"| `{section_name}.{key}` | {_type_name(sub)} | `{defaults[key]}` |")
        lines.append("")
        if section is MethodConfig:
            lines += _method_options_reference()
    return "\n".join(lines)


def _type_name(field: Any) -> str:
    kind = str(field.annotation).replace("typing.", "").replace("pathlib.", "")
    kind = kind.replace("<class '", "").replace("'>", "").replace("|", "\\|")
    return re.sub(r"(__main__|sqakd\.[\w.]+)\.", "", kind)


def _method_options_reference() -> list[str]:
    """Each registered method's own keys under ``method:``."""
    from .methods import available_methods, method_class

    lines = ["Each method's own keys under `method:` (anything else is refused):", ""]
    for name in available_methods():
        if name.startswith("test_"):  # methods registered by the test suite
            continue
        options = method_class(name).Options
        if not options.model_fields:
            lines += [f"- `{name}`: no options", ""]
            continue
        defaults = options().model_dump(mode="json")
        lines += [f"- `{name}`:", "", "  | key | type | default |", "  |---|---|---|"]
        for key, sub in options.model_fields.items():
            lines.append(f"  | `method.{key}` | {_type_name(sub)} | `{defaults[key]}` |")
        lines.append("")
    return lines


if __name__ == "__main__":
    print(config_reference())
