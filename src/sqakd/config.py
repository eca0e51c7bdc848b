"""The typed run configuration: one YAML file (plus ``key=value`` overrides) describes a run.

Everything is validated once, here, at the edge: an unknown key, a wrong type or a value out of
range is reported with the key's dotted name and the fix, never as a traceback deep in training.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .quant.policy import QuantPolicy


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunConfig(Section):
    """Where the run's files go and how it runs (precision bf16: autocast, quantizers float32).

    ``precision``: ``bf16`` runs each training step under ``torch.autocast`` (teacher and student
    forwards in bfloat16; quantizer rounding, losses, gradients, weights and evaluation in
    float32); ``fp16`` likewise with float16 and a gradient scaler, on CUDA only."""

    output: Path = Path("runs/run")
    overwrite: bool = False
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = False
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = Field(None, ge=1)
    sync_batchnorm: bool = False
    compile: bool | Literal["auto"] = "auto"
    channels_last: bool = False
    precision: Literal["float32", "bf16", "fp16"] = "float32"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(
                f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {value!r}"
            )
        return value

    @field_validator("precision")
    @classmethod
    def _fp16_on_cuda(cls, value: str, info: ValidationInfo) -> str:
        device = info.data.get("device")
        if value == "fp16" and device in ("cpu", "mps"):
            raise ValueError(
                f"fp16 needs a CUDA device (run.device is {device}); on {device} use "
                "run.precision: bf16 (or float32)"
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
    # a data-free run without data.root: the teacher's input size (channels: len(data.mean))
    image_size: tuple[int, int] | None = None
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    augment: AugmentConfig = AugmentConfig()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    limit_train: int | None = Field(None, ge=1)
    stratified_limit: bool = False  # limit_train draws each class in proportion to its size
    limit_test: int | None = Field(None, ge=1)
    cache_dir: Path | None = None
    classes: list[str] | None = None  # the training split's class names (recorded by a run)
    #: training batches made ahead in a background thread while a step runs (0: none)
    prefetch_batches: int = Field(1, ge=0, le=4)


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
    eval_every: int = Field(1, ge=1)  # evaluate every N epochs (and always after the last)
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


#: a recipe larger than this is refused before it is parsed (real recipes are a few kB)
MAX_YAML_BYTES = 1_000_000
#: nodes a YAML document may expand to once its aliases are followed ("billion laughs" guard)
MAX_YAML_NODES = 100_000
#: characters of user input an error message echoes
MAX_ECHO = 200


def shorten(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, cut to ``limit`` characters (error messages never echo a whole file)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past ``MAX_YAML_NODES``
    nodes: the parsed tree shares aliased nodes, but validation and dumps would expand them."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _expanded_size(node: Any, sizes: dict[int, int], active: set[int]) -> int:
    """Nodes of ``node`` with every alias expanded (memoised per node, so this stays linear)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:  # a recursive alias: its expansion is infinite
        raise ValueError("the YAML document refers to itself through an alias (&/*)")
    active.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes, active) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(
            _expanded_size(key, sizes, active) + _expanded_size(value, sizes, active)
            for key, value in node.value
        )
    active.discard(id(node))
    if size > MAX_YAML_NODES:
        raise ValueError(
            f"the YAML document expands to more than {MAX_YAML_NODES} values through its "
            "aliases (&/*); write the values out or use fewer aliases"
        )
    sizes[id(node)] = size
    return size


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML with :class:`_BoundedLoader`; every failure is a ``ValueError`` naming
    ``source`` (and the line, for a syntax error)."""
    if len(text) > MAX_YAML_BYTES:
        raise ValueError(
            f"{source} is {len(text)} characters long; a recipe is at most {MAX_YAML_BYTES}"
        )
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{source} is not valid YAML{where}: {problem}") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"quant.weight_bits=2"`` -> ``("quant.weight_bits", 2)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(
            f"override {shorten(text)} must look like key.sub=value, e.g. quant.weight_bits=2"
        )
    key = key.strip()
    return key, read_yaml(raw, f"the value of override {key!r}") if raw.strip() else None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Read a YAML recipe (optional), apply ``key=value`` overrides, validate, return a Config."""
    tree: dict[str, Any] = copy.deepcopy(base or {})  # the caller's base stays as it was
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"config file {path} is a folder; give the YAML recipe (e.g. {path / 'config.yaml'})"
            )
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; give the path to a YAML recipe")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ValueError(
                f"config file {path} is {path.stat().st_size} bytes; a recipe is at most "
                f"{MAX_YAML_BYTES} (is it the right file?)"
            )
        loaded = read_yaml(path.read_text(errors="replace"), f"config file {path}") or {}
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
    _refuse_booleans(Config, tree, "")
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None


def _refuse_booleans(model: type[BaseModel], tree: Any, prefix: str) -> None:
    """``quant.weight_bits: true`` is a mistake, not 1: a boolean given where a number belongs
    is refused with the key's name (pydantic's lax mode would read it as 1 or 0)."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        field = model.model_fields.get(str(key))
        if field is None:
            continue
        kinds = _kinds(field.annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(
                f"config key '{prefix}{key}' must be a number, got {value!r} (a boolean)"
            )
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                _refuse_booleans(kind, value, f"{prefix}{key}.")
        origin_args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is dict and isinstance(value, dict):
            inner = origin_args[1] if len(origin_args) == 2 else None
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                for name, item in value.items():
                    _refuse_booleans(inner, item, f"{prefix}{key}.{name}.")


def _kinds(annotation: Any) -> set[Any]:
    """The plain types of an annotation (``int | None`` -> ``{int, NoneType}``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {kind for arg in typing.get_args(annotation) for kind in _kinds(arg)}
    return {annotation}


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
            messages.append(
                f"config key {location!r}: {item['msg']} (got {shorten(item.get('input'))})"
            )
    return "; ".join(message[: 2 * MAX_ECHO] for message in messages)


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


#: keys a ``--resume`` may change: they do not alter what is trained (where files go, how long,
#: how it is shown, how fast it runs); every other key must match the run folder's config.yaml
RESUME_MAY_CHANGE = (
    "run.output", "run.overwrite", "run.device", "run.progress", "run.tensorboard", "run.threads",
    "run.compile", "run.channels_last", "train.epochs", "train.checkpoint_every",
    "train.checkpoint_every_steps", "data.cache_dir", "data.eval_batch_size", "data.limit_test",
    "data.prefetch_batches",
)  # fmt: skip


#: keys a run fills in from its data (compared on --resume once both sides know them)
RECORDED_BY_RUN = ("data.mean", "data.std", "data.classes")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and empty dicts are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def resume_conflicts(saved: Config, new: Config) -> list[str]:
    """The keys (``key: saved -> new``) in which ``new`` would train something other than the
    run ``saved`` describes; the keys of :data:`RESUME_MAY_CHANGE` are allowed to differ."""
    old_keys = flatten(saved.model_dump(mode="json"))
    new_keys = flatten(new.model_dump(mode="json"))
    conflicts = []
    for key in sorted(set(old_keys) | set(new_keys)):
        if key.startswith(tuple(f"{allowed}." for allowed in RESUME_MAY_CHANGE)):
            continue
        if key in RESUME_MAY_CHANGE:
            continue
        before, after = old_keys.get(key), new_keys.get(key)
        if key in RECORDED_BY_RUN and (before is None or after is None):
            continue  # not known yet (before the data is read), or a run that did not record it
        if before != after:
            conflicts.append(f"{key}: {shorten(before, 60)} -> {shorten(after, 60)}")
    return conflicts


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
