"""Checkpoint loading that never executes code, for the checkpoint layouts found in the wild.

``.safetensors`` files are read with safetensors; anything else with
``torch.load(weights_only=True)``, which refuses pickles that would run code. The state dict may
be bare or wrapped as ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``
or ``{"net": ...}``; the ``module.`` prefix of DataParallel/DDP and the ``_orig_mod.`` prefix of
``torch.compile`` are removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: keys under which training scripts commonly store the model's state dict, in the order tried
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
#: prefixes added by wrappers: DataParallel / DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: how many key names an error message lists
SHOWN_KEYS = 5


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model weights stored at ``path`` as a flat ``{name: tensor}`` dict (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return normalise_state_dict(_read_safetensors(path), source=str(path))
    return normalise_state_dict(_read_torch(path), source=str(path))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        raise ValueError(
            f"checkpoint {path} is not a readable safetensors file ({_first_line(error)}); "
            "it is truncated or corrupt"
        ) from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        if "weights only load failed" in str(error).lower():
            raise ValueError(
                f"checkpoint {path} is not a plain weights file: loading it would run code "
                f"({_refused_global(error)}); re-save it as a state_dict "
                "(torch.save(model.state_dict(), path)) or as .safetensors"
            ) from None
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {_first_line(error)}); "
            "it is truncated, corrupt or not a PyTorch file"
        ) from None


def _refused_global(error: Exception) -> str:
    """The line of torch's message that names what the unpickler refused."""
    for line in str(error).splitlines():
        if "unsupported global" in line.lower() or "unsupported operand" in line.lower():
            return line.strip().rstrip(".")[:200]
    return _first_line(error)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def normalise_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Unwrap a checkpoint to its ``{name: tensor}`` state dict and strip wrapper prefixes."""
    state, seen = checkpoint, set()
    while isinstance(state, Mapping) and not _is_state_dict(state) and id(state) not in seen:
        seen.add(id(state))  # a (crafted) dict that contains itself must not loop forever
        inner = next(
            (state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None
        )
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        if not isinstance(state, Mapping):
            found = f"a {type(state).__name__}"
        else:
            found = f"a dict with keys {_names(list(state))}" if state else "an empty dict"
        raise ValueError(
            f"{source} holds {found}, not a state dict of tensors; expected a bare state_dict or "
            f"one under {', '.join(repr(k) for k in WRAPPER_KEYS)}"
        )
    return _strip_prefixes(dict(state))


def _is_state_dict(state: Mapping) -> bool:
    return len(state) > 0 and all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    )


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove a wrapper prefix while every key carries it (they may be stacked)."""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {key[len(prefix) :]: value for key, value in state.items()}


def load_weights(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any], strict: bool = True
) -> nn.Module:
    """Load a checkpoint file or state dict into ``model`` (in place) and return ``model``.

    Keys are matched by name. Any shape mismatch is an error; missing or unexpected keys are an
    error when ``strict`` (the message names the first few of each, with counts).
    """
    if isinstance(path_or_state_dict, Mapping):
        state = normalise_state_dict(path_or_state_dict, source="the state dict")
        source = "the state dict"
    else:
        state = read_state_dict(path_or_state_dict)
        source = f"checkpoint {path_or_state_dict}"
    problems = _mismatch(model.state_dict(), state, strict)
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=strict)
    return model


def _mismatch(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], strict: bool
) -> list[str]:
    problems = []
    if strict:
        missing = [key for key in expected if key not in given]
        unexpected = [key for key in given if key not in expected]
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    shapes = [
        f"{key} (checkpoint {_shape(given[key])}, model {_shape(tensor)})"
        for key, tensor in expected.items()
        if key in given and given[key].shape != tensor.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_names(shapes)}")
    return problems


def _names(items: list[Any]) -> str:
    shown = ", ".join(str(item) for item in items[:SHOWN_KEYS])
    return shown + (f", ... ({len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else "")


def _shape(tensor: Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"
