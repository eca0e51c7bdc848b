"""Models by name: one constructor signature, ``build_model(name, num_classes, in_channels)``.

A registered name builds one of our architectures. A name of the form ``package.module:function``
or ``path/to/file.py:function`` imports the user's own builder and calls it with the same keyword
arguments, so any ``nn.Module`` can be quantized and distilled without registering it.

Each registered model also declares its stage names (timm's ``feature_info`` idea): the modules
whose outputs are the final feature maps of its resolution stages, never modified in place
afterwards, so forward hooks on them (:class:`sqakd.distill.FeatureTaps`) see what the next
stage sees. ``taps: stages`` in a config resolves to them through :func:`resolve_tap_names`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

#: the tap spec that means "the registered model's stage names"
STAGES = "stages"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its builder and the module names of its stage outputs."""

    builder: Callable[..., nn.Module]
    stages: tuple[str, ...]


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, stages: Sequence[str] = ()) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(num_classes=..., in_channels=..., **options)`` available as ``name``.

    ``stages`` names the submodules whose outputs are the model's stage feature maps, shallow to
    deep (e.g. ``("layer1", "layer2", "layer3")``); :func:`model_stages` returns them.
    """
    if isinstance(stages, str) or not all(isinstance(s, str) and s for s in stages):
        raise ValueError(
            f"stages of model {name!r} must be a sequence of module names, got {stages!r}"
        )

    def add(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if ":" in name:
            raise ValueError(
                f"model name {name!r} may not contain ':' (reserved for module:function)"
            )
        _MODELS[name] = ModelEntry(builder, tuple(stages))
        return builder

    return add


def available_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def build_model(
    name: str, num_classes: int = 10, in_channels: int | None = None, **kwargs: Any
) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    ``name`` is a registered name (see :func:`available_models`) or a user builder given as
    ``package.module:function`` / ``path/to/file.py:function``. ``in_channels=None`` keeps the
    architecture's default (3 for colour images, 1 for ``small_cnn``). ``kwargs`` are the
    architecture's own options (e.g. ``width_mult`` for MobileNetV2).
    """
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{label} must be a positive whole number, got {value!r}")
    builder = _user_builder(name) if ":" in name else _registered_builder(name)
    arguments = {"num_classes": num_classes, **kwargs}
    if in_channels is not None:
        arguments["in_channels"] = in_channels
    _check_arguments(name, builder, arguments)
    model = builder(**arguments)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model builder {name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def model_stages(name: str) -> tuple[str, ...]:
    """The module names of the registered model ``name``'s stage outputs, shallow to deep.

    A user model (``package.module:function`` or ``file.py:function``) has none: name its
    modules instead.
    """
    if ":" in name:
        raise ValueError(
            f"model {name!r} is your own, so it has no registered stage names; name the modules "
            "to tap instead, e.g. method.layers: [block1, block2]"
        )
    stages = _registered_entry(name).stages
    if not stages:
        raise ValueError(
            f"model {name!r} declares no stage names; register it with "
            f"register_model({name!r}, stages=(...)) or name the modules to tap"
        )
    return stages


def resolve_tap_names(spec: str | Sequence[str], model_name: str) -> list[str]:
    """The module names to tap: the model's stage names for ``"stages"``, else ``spec`` itself.

    ``spec`` is the string ``"stages"`` or a non-empty list of module names; whether the names
    exist in the model is checked when the taps are created (:class:`sqakd.distill.FeatureTaps`).
    """
    if isinstance(spec, str):
        if spec != STAGES:
            raise ValueError(
                f"layers to tap must be 'stages' or a list of module names, got {spec!r}; "
                f"write [{spec}] for one module"
            )
        return list(model_stages(model_name))
    names = list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"layers to tap must be 'stages' or a non-empty list of module names, got {spec!r}"
        )
    return names


def residual_bodies(model: nn.Module) -> list[str]:
    """The module names of every residual block's body output (before the shortcut is added),
    in model order: blocks declare the submodule as ``body_output`` (the CIFAR and ImageNet
    ResNets' ``bn2``, MobileNetV2's projection batch norm). Empty for a model without such
    blocks."""
    return [
        f"{name}.{module.body_output}"
        for name, module in model.named_modules()
        if name and isinstance(getattr(module, "body_output", None), str)
    ]


def _registered_builder(name: str) -> Callable[..., nn.Module]:
    return _registered_entry(name).builder


def _registered_entry(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(available_models())}, "
            "or give your own as 'package.module:function' or 'path/to/file.py:function'"
        ) from None


def _user_builder(spec: str) -> Callable[..., nn.Module]:
    """Import ``module:function`` or ``file.py:function`` and return the function."""
    location, _, function_name = spec.rpartition(":")
    if not location or not function_name.isidentifier():
        raise ValueError(
            f"model {spec!r} is not of the form 'package.module:function' or 'path/to/file.py:function'"
        )
    module = _import_file(location) if location.endswith(".py") else _import_module(location)
    builder = getattr(module, function_name, None)
    if builder is None:
        raise ValueError(f"model {spec!r}: {location} has no attribute {function_name!r}")
    if not callable(builder):
        raise ValueError(
            f"model {spec!r}: {function_name} is a {type(builder).__name__}, not a function"
        )
    return builder


def _import_module(location: str) -> Any:
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"model module {location!r} cannot be imported ({error}); put it on PYTHONPATH or "
            "give a file as 'path/to/file.py:function'"
        ) from None


def _import_file(location: str) -> Any:
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"model file {location} does not exist")
    module_name = f"sqakd_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"model file {location} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _check_arguments(
    name: str, builder: Callable[..., nn.Module], arguments: dict[str, Any]
) -> None:
    """Report an option the builder does not take as one line naming the ones it does."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(**arguments)
    except TypeError as error:
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ValueError(
            f"model {name!r} cannot be called with {', '.join(arguments)} ({error}); "
            f"it accepts: {', '.join(accepted) or 'no keyword arguments'}"
        ) from None
