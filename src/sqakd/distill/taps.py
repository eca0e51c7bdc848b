"""Feature taps: the outputs (or inputs) of named submodules, captured by forward hooks.

``FeatureTaps(model, ["layer2", "layer3"])`` registers one hook per name on the model as it is
(no model is rewritten) and, on every forward call, collects what those modules returned into a
dict keyed by name, in the order of ``names``::

    with FeatureTaps(student, model_stages("resnet20")) as taps:
        logits, features = taps(images)            # features["layer2"]: [B, 32, 16, 16]

A ``DistributedDataParallel`` (or ``DataParallel``) wrapper is unwrapped: the hooks go on
``model.module`` and calling the taps calls the wrapper. A method that calls the model itself
reads ``taps.features`` afterwards; every forward of the model starts a fresh dict, so features
of one call never leak into the next.

Create the taps after :func:`sqakd.quant.prepare`: prepare swaps Conv2d/Linear modules for
quantized twins, so a hook on a swapped layer would be left on the float module that is no longer
called (hooks on containers such as ``layer2`` survive the swap). A deep copy of a tapped model
(prepare copies by default) carries the hooks along, but they ignore the copy's calls: taps
capture only from the modules they were created on.

Pitfall: a module whose output is later modified in place (``nn.ReLU(inplace=True)`` after a
batch norm) hands the hook a tensor that changes afterwards. Each captured tensor's version
counter is recorded in the hook and checked when the features are read; a change raises an error
that names the layer. Tap the enclosing block, or pass ``clone=True`` to copy in the hook.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Capture = Literal["output", "input"]

#: how many real layer names an unknown-name error lists
_LISTED_NAMES = 12


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


class FeatureTaps:
    """Outputs (``capture="output"``) or first inputs (``capture="input"``) of named submodules,
    captured by forward hooks on every forward call of ``model``.

    ``clone=True`` copies each tensor in the hook (safe against later in-place changes, at the
    cost of one copy per tapped tensor). :meth:`remove` (or leaving a ``with`` block) takes the
    hooks off again.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        capture: Capture = "output",
        clone: bool = False,
    ) -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
        if isinstance(names, str):
            raise ValueError(
                f"names must be a list of module names, got {names!r}; write [{names!r}]"
            )
        self.model = model
        self.names = tuple(names)
        self.capture = capture
        self.clone = clone
        plain = unwrap(model)
        modules = _find_modules(plain, self.names)
        self._plain, self._modules = plain, modules
        self._model_type = type(plain).__name__
        self._captured: dict[str, Tensor] = {}
        self._versions: dict[str, int | None] = {}
        self._repeated: list[str] = []
        self._ran = False
        self._handles: list[RemovableHandle] = [plain.register_forward_pre_hook(self._start)]
        for name in self.names:
            if capture == "output":
                hook = modules[name].register_forward_hook(self._output_hook(name))
            else:
                hook = modules[name].register_forward_pre_hook(self._input_hook(name))
            self._handles.append(hook)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """Run the model on ``args`` and return ``(its output, the features of this call)``."""
        output = self.model(*args, **kwargs)
        return output, self.features

    @property
    def features(self) -> dict[str, Tensor]:
        """The tensors captured in the model's last forward call, keyed by name in order of
        ``names``; raises if one did not run, ran twice, or was modified in place since."""
        if not self._handles:
            raise RuntimeError("these feature taps were removed; create new ones to tap again")
        if not self._ran:
            raise RuntimeError(
                "no forward has run since the feature taps were created; call the model "
                "(or taps(images)) first"
            )
        for name in self.names:
            self._check(name)
        return {name: self._captured[name] for name in self.names}

    def remove(self) -> None:
        """Take every hook off the model; the taps capture nothing afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "" if self._handles else ", removed"
        return (
            f"FeatureTaps({self._model_type}, {list(self.names)}, capture={self.capture!r}{state})"
        )

    def _start(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the whole model: a new call collects into a new dict."""
        if module is not self._plain:  # a deep copy of the model (e.g. by prepare) keeps the hook
            return
        self._captured, self._versions, self._repeated = {}, {}, []
        self._ran = True

    def _output_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module is self._modules[name]:
                self._keep(name, output)

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if module is not self._modules[name]:
                return
            if not args:
                raise ValueError(
                    f"layer {name!r} was called without positional inputs; tap its output instead"
                )
            self._keep(name, args[0])

        return hook

    def _keep(self, name: str, value: Any) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(
                f"layer {name!r}'s {self.capture} is a {type(value).__name__}, not a tensor; "
                "tap a module that takes or returns one tensor"
            )
        if name in self._captured:
            self._repeated.append(name)
            return
        if self.clone:
            value = value.clone()
        self._captured[name] = value
        # inference tensors carry no version counter: their in-place changes go unnoticed
        self._versions[name] = None if value.is_inference() else value._version

    def _check(self, name: str) -> None:
        """Raise when ``name`` did not run once in the last forward or changed since."""
        if name in self._repeated:
            raise RuntimeError(
                f"layer {name!r} ran more than once in one forward of {self._model_type} (a "
                "shared module?); tap a module that runs once per forward"
            )
        if name not in self._captured:
            raise RuntimeError(
                f"layer {name!r} did not run in the last forward of {self._model_type} (replaced "
                "by quant.prepare? create the taps after prepare); tap a module the forward calls"
            )
        version = self._versions[name]
        if version is not None and self._captured[name]._version != version:
            raise RuntimeError(
                f"the {self.capture} of layer {name!r} was modified in place after it was "
                "tapped (an in-place ReLU?); tap the enclosing block or pass clone=True"
            )


def _find_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: submodule}`` for every name; an unknown name raises with close matches."""
    if not names:
        raise ValueError("no layers to tap; name at least one module, e.g. ['layer2']")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"layer {repeated[0]!r} is named twice; tap each module once")
    found = {name: module for name, module in model.named_modules() if name}
    for name in names:
        if name not in found:
            raise ValueError(_unknown_layer_message(name, type(model).__name__, list(found)))
    return {name: found[name] for name in names}


def _unknown_layer_message(name: Any, model_type: str, known: list[str]) -> str:
    """One line: the unknown name, close matches, and some real names (shallowest first)."""
    message = f"no layer {name!r} in {model_type}"
    close = difflib.get_close_matches(str(name), known, n=3) if isinstance(name, str) else []
    message += f"; did you mean {_either(close)}?" if close else ";"
    if not known:
        return message + f" {model_type} has no submodules"
    shallow_first = sorted(known, key=lambda n: n.count("."))  # stable: model order per depth
    listed = ", ".join(shallow_first[:_LISTED_NAMES])
    more = f", ... ({len(known)} in all)" if len(known) > _LISTED_NAMES else ""
    return message + f" layers are: {listed}{more}"


def _either(names: list[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(name) for name in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
