"""The method contract: what a training method declares and what it computes.

The trainer owns the loop (epochs, batches, checkpoints, logs, processes); the method owns its
step. A method declares, before anything is built:

- :class:`Needs`: labels or not, the teacher's role, whether it reads training data at all, and
  whether it needs each sample's index;
- its typed ``Options`` (the keys under ``method:`` in a recipe, validated at the edge);
- its parameter groups (one optimizer and schedule each) and its phases (a pure function of the
  epoch, so that nothing about phases needs saving and a mid-epoch resume stays exact).

A one-update method writes only :meth:`Method.losses`; a method with several updates per batch
(a generator, then the student) overrides :meth:`Method.training_step` and calls
``step.update(losses, groups)`` once per update. See ``docs/architecture.md`` for a worked
example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from ..quant.layers import model_parameters, quantizer_parameters

if TYPE_CHECKING:
    from ..config import MethodConfig, OptimizerConfig

TeacherRole = Literal["none", "logits", "features", "trainable"]
TEACHER_ROLES: tuple[str, ...] = ("none", "logits", "features", "trainable")
#: the parameter group of a teacher whose role is ``trainable``
TEACHER_GROUP = "teacher"


@dataclass(frozen=True)
class Needs:
    """What a method asks of the run; the pipeline reads it before it builds anything.

    teacher:
        ``none``: no teacher is handed to the step (a checkpoint may still initialise the
        student); ``logits``: frozen, batch norm may be folded and its logits cached (only its
        output is read); ``features``: a frozen eval-mode copy that is never folded or cached, so
        forward hooks fire and batch norms exist; ``trainable``: a train-mode copy with its own
        optimizer group (:data:`TEACHER_GROUP`), checkpointed with the student.
    data:
        ``train``: the training split is read; ``none``: data-free, only the test split is read
        (for evaluation) and every batch carries only its size.
    """

    labels: bool = False
    teacher: TeacherRole = "logits"
    data: Literal["train", "none"] = "train"
    quantized_student: bool = True
    sample_index: bool = False
    find_unused_parameters: bool = False
    #: the setting that makes a labeled method read no label (``method.labels=false``), named in
    #: the error when the training images have no labels
    label_free_setting: str = ""

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_ROLES:
            raise ValueError(
                f"teacher role {self.teacher!r} is not one of {', '.join(TEACHER_ROLES)}"
            )
        if self.data not in ("train", "none"):
            raise ValueError(f"data need {self.data!r} must be 'train' or 'none'")
        if self.data == "none" and (self.labels or self.sample_index):
            raise ValueError("a data-free method (data='none') can read no labels or indices")


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs: its name (logged, and a column of metrics.csv), its length and the
    parameter groups it trains (``None``: every group the method has)."""

    name: str
    epochs: int
    trains: tuple[str, ...] | None = None


@dataclass
class Batch:
    """One training batch. ``images`` is ``None`` for data-free methods, which get only ``size``
    (the per-process batch size); ``labels`` only when the method needs labels; ``index`` (each
    sample's position in the training set) only when it needs sample indices."""

    images: Tensor | None
    labels: Tensor | None = None
    index: Tensor | None = None
    size: int = 0

    #: dict keys read by :meth:`from_dict`, in the order tried
    IMAGE_KEYS = ("input", "inputs", "images", "image", "x", "input_ids", "pixel_values")
    LABEL_KEYS = ("labels", "label", "targets", "target", "y")

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> Batch:
        """A dict batch (``{"images": ..., "labels": ...}``, ``{"input_ids": ...}``, ...) as a
        batch: the first of :attr:`IMAGE_KEYS` and of :attr:`LABEL_KEYS` present."""
        key = next((k for k in cls.IMAGE_KEYS if k in item), None)
        if key is None:
            raise ValueError(
                f"the dict batch has none of the input keys {', '.join(cls.IMAGE_KEYS)}; its keys "
                f"are {', '.join(map(repr, item))}: rename the input or yield (inputs, labels)"
            )
        labels = next((item[k] for k in cls.LABEL_KEYS if k in item), None)
        images = item[key]
        return cls(images, labels, item.get("index"), int(images.shape[0]))

    @classmethod
    def of(cls, item: Any) -> Batch:
        """A loader's item as a batch: a :class:`Batch`; an ``int`` (a data-free loader's batch:
        only its size); bare images; a dict (:meth:`from_dict`); ``(images,)``;
        ``(images, labels)``; or ``(images, labels, index)``."""
        if isinstance(item, Batch):
            return item
        if isinstance(item, int):
            return cls(None, size=item)
        if isinstance(item, Tensor):
            return cls(item, size=int(item.shape[0]))
        if isinstance(item, Mapping):
            return cls.from_dict(item)
        if isinstance(item, (tuple, list)) and len(item) == 1:
            return cls(item[0], size=int(item[0].shape[0]))
        images, labels, *rest = item
        index = rest[0] if rest else None
        return cls(images, labels, index, 0 if images is None else int(images.shape[0]))


@dataclass
class Models:
    """The networks a step runs. ``student`` is the module to call (its DistributedDataParallel
    wrapper under torchrun); ``teacher`` is prepared for the method's declared role (``None``
    for role ``none``)."""

    student: nn.Module
    teacher: nn.Module | None = None


@dataclass(frozen=True)
class DataShapes:
    """What a method may size its own modules by: one image's shape (C, H, W), the number of
    classes, the number of training images (0 for a data-free run) and the teacher's and the
    student's model names (for their registered stage names:
    ``sqakd.models.resolve_tap_names(spec, model_name)``; the same unless ``student.name`` gives
    the student its own architecture)."""

    image_shape: tuple[int, int, int]
    num_classes: int
    train_size: int = 0
    model_name: str = ""
    student_model_name: str = ""

    @property
    def student_model(self) -> str:
        """The student's model name (the teacher's when none is given)."""
        return self.student_model_name or self.model_name


class Step(Protocol):
    """The handle a step gets from the trainer (implemented in ``sqakd.engine.trainer``)."""

    phase: Phase
    epoch: int  # 0-based epoch of the run
    device: torch.device

    def update(self, losses: Mapping[str, Tensor], groups: Sequence[str] | None = None) -> None:
        """zero-grad (groups) -> finite check -> backward of the sum -> clip -> optimizer and
        schedule steps (groups). ``groups`` defaults to every group the phase trains."""


class NoOptions(BaseModel):
    """A method without options: any key under ``method:`` besides ``name`` is refused."""

    model_config = ConfigDict(extra="forbid")


class Method(nn.Module):
    """A training method. Set ``label``, ``Options`` and ``needs``; write :meth:`losses` (one
    update per batch) or :meth:`training_step` (several). Whatever the method builds
    (adapters, a generator, projections, memory banks) must be a submodule or buffer, so that it
    is in the checkpoint; built in :meth:`setup` when it depends on the networks."""

    label: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    needs: Needs = Needs()

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else self.Options()

    # ----------------------------------------------------------------- what the run is built of
    def setup(self, models: Models, shapes: DataShapes) -> None:
        """Build what depends on the networks (taps, adapters, a generator). Called once, with
        the plain (unwrapped) modules, after the student is prepared and before it is
        calibrated: probe the teacher, not the student, for feature shapes."""

    def parameter_groups(self, models: Models) -> dict[str, list[nn.Parameter]]:
        """Named groups, one optimizer and schedule each: the student's ``weights`` and
        ``quantizers``, the teacher's (role ``trainable``) and the method's own parameters
        (``adapters``), each only when it has parameters."""
        groups = student_groups(models.student)
        if self.needs.teacher == "trainable" and models.teacher is not None:
            groups[TEACHER_GROUP] = [p for p in models.teacher.parameters() if p.requires_grad]
        own = [p for p in self.parameters() if p.requires_grad]
        if own:
            groups["adapters"] = own
        return groups

    def optimizer_settings(self, group: str, default: OptimizerConfig) -> OptimizerConfig:
        """Settings of a group the recipe does not configure (``train.optimizers.<group>``);
        ``default`` is the student's weight settings."""
        return default

    def phases(self, epochs: int) -> list[Phase]:
        """The run's phases; their epochs must add up to ``epochs``."""
        return [Phase("train", epochs)]

    def enter_phase(self, models: Models, phase: Phase) -> None:
        """Called at the start of every epoch (also a resumed one), after the trainer has put
        the student and the method in train mode and a trainable teacher in the mode its phase
        asks for: set any other mode the phase needs (e.g. the student's batch norms in eval
        mode, activation ranges frozen after a warm-up). ``models`` holds the plain modules."""

    def calibration_images(self, batches: Iterable[Batch]) -> Iterator[Tensor]:
        """Images to initialise the student's quantizers with (data-free methods: generate)."""
        for batch in batches:
            if batch.images is None:
                raise ValueError(
                    f"{type(self).__name__} reads no training data; override calibration_images"
                )
            yield batch.images

    # ------------------------------------------------------------------------------ the step
    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        """Named loss terms of one batch (weighted; their sum is minimised)."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses or training_step")

    def training_step(self, models: Models, batch: Batch, step: Step) -> dict[str, Tensor]:
        """One batch: losses, then one update of the phase's groups. Returns the losses for the
        log (averaged per epoch)."""
        losses = self.losses(models, batch, step.phase)
        step.update(losses)
        return losses


def student_groups(student: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``weights`` (every trainable parameter but the quantizers') and ``quantizers``."""
    plain = getattr(student, "module", student)  # a DistributedDataParallel wrapper
    return {
        "weights": [p for p in model_parameters(plain) if p.requires_grad],
        "quantizers": [p for p in quantizer_parameters(plain) if p.requires_grad],
    }


def check_phases(phases: Sequence[Phase], epochs: int, groups: Iterable[str]) -> None:
    """One-line errors for a phase plan that does not fit the run."""
    total = sum(phase.epochs for phase in phases)
    if total != epochs or any(phase.epochs < 0 for phase in phases):
        plan = " + ".join(f"{phase.name} {phase.epochs}" for phase in phases)
        raise ValueError(
            f"the method's phases last {plan} = {total} epochs but train.epochs is {epochs}; "
            "make the phase epochs add up to train.epochs"
        )
    known = set(groups)
    for phase in phases:
        unknown = [group for group in phase.trains or () if group not in known]
        if unknown:
            raise ValueError(
                f"phase {phase.name!r} trains group {unknown[0]!r}, which the method does not "
                f"have; its groups are: {', '.join(sorted(known))}"
            )


def phase_at(phases: Sequence[Phase], epoch: int) -> Phase:
    """The phase that epoch ``epoch`` (0-based) belongs to."""
    end = 0
    for phase in phases:
        end += phase.epochs
        if epoch < end:
            return phase
    return phases[-1]


# ------------------------------------------------------------------------------------ registry
MethodClass = TypeVar("MethodClass", bound=type[Method])
_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    def add(cls: MethodClass) -> MethodClass:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = cls
        return cls

    return add


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown training method {name!r}; choose one of: {', '.join(available_methods())}"
        ) from None


def validate_options(name: str, options: Mapping[str, Any]) -> BaseModel:
    """The typed options of method ``name``; errors name the key as ``method.<key>``."""
    cls = method_class(name)
    try:
        return cls.Options.model_validate(dict(options))
    except ValidationError as error:
        raise ValueError(describe_option_errors(name, cls.Options, error)) from None


def describe_option_errors(name: str, schema: type[BaseModel], error: ValidationError) -> str:
    import difflib

    messages = []
    for item in error.errors():
        key = ".".join(["method", *(str(part) for part in item["loc"])])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), list(schema.model_fields), n=1)
            hint = (
                f"did you mean 'method.{close[0]}'?"
                if close
                else f"its options are: {', '.join(schema.model_fields) or 'none'}"
            )
            messages.append(f"unknown config key {key!r} for method {name!r}; {hint}")
        elif item["type"] == "value_error":
            message = str(item["msg"]).removeprefix("Value error, ")
            messages.append(f"config key {key!r}: {message}")
        else:
            messages.append(f"config key {key!r}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(messages)


def build_method(config: MethodConfig) -> Method:
    """The method ``config.name`` with its options validated."""
    return method_class(config.name)(validate_options(config.name, config.options))
