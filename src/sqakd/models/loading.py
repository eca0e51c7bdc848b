"""Checkpoint loading that never executes code, for the checkpoint layouts found in the wild.

``.safetensors`` files are read with safetensors; anything else with
``torch.load(weights_only=True)``, which refuses pickles that would run code. The state dict may
be bare or wrapped as ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``
or ``{"net": ...}``; the ``module.`` prefix of DataParallel/DDP and the ``_orig_mod.`` prefix of
``torch.compile`` are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

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
    model: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, Any],
    strict: bool = True,
    key_map: Mapping[str, str] | None = None,
    match: Literal["names", "shapes"] = "names",
    log: Callable[[str], None] | None = None,
    source: str | None = None,
) -> nn.Module:
    """Load a checkpoint file or state dict into ``model`` (in place) and return ``model``.

    Keys are matched by name, after three repairs for checkpoints from other implementations:
    batch norms' ``num_batches_tracked`` buffers missing from the file (older PyTorch) are
    filled with 0 as PyTorch does; ``key_map`` renames key prefixes (``{"linear.": "fc."}``;
    an entry that matches no key is an error); and a model's own ``checkpoint_key_map``
    attribute (the registry's CIFAR ResNets: ``linear.`` -> ``fc.``) is applied when the keys do
    not match without it. Any shape mismatch is an error; missing or unexpected keys are an
    error when ``strict`` (the message names the first few of each, with counts, and proposes
    the key map when the shapes match one to one in order). ``match="shapes"`` pairs such keys
    in order and calls ``log`` with every pairing. ``source`` names the weights in messages
    (default: the file, or "the state dict").
    """
    if isinstance(path_or_state_dict, Mapping):
        source = source or "the state dict"
        state = normalise_state_dict(path_or_state_dict, source=source)
    else:
        state = read_state_dict(path_or_state_dict)
        source = source or f"checkpoint {path_or_state_dict}"
    expected = model.state_dict()
    if key_map:
        state = rename_keys(state, key_map, source)
    aliases = getattr(model, "checkpoint_key_map", None)
    if aliases and any(key not in expected for key in state):
        renamed = rename_keys(state, aliases, source, required=False)
        if set(renamed) <= set(expected):
            state = renamed
    state = _fill_batch_counts(expected, state)
    if match == "shapes":
        state = _pair_by_shapes(expected, state, source, log)
    problems = _mismatch(expected, state, strict)
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=strict)
    return model


def rename_keys(
    state: Mapping[str, Tensor], key_map: Mapping[str, str], source: str, required: bool = True
) -> dict[str, Tensor]:
    """``state`` with each key's prefix renamed by the first ``key_map`` entry it starts with.
    With ``required``, an entry that matches no key is an error naming it."""
    unused = [old for old in key_map if not any(key.startswith(old) for key in state)]
    if unused and required:
        prefixes = sorted({key.split(".")[0] + "." for key in state})
        raise ValueError(
            f"key map entry {unused[0]!r} matches no key of {source}; its keys begin with "
            f"{_names(prefixes)}"
        )
    renamed = {}
    for key, value in state.items():
        old = next((old for old in key_map if key.startswith(old)), None)
        renamed[key if old is None else key_map[old] + key[len(old) :]] = value
    return renamed


def _fill_batch_counts(
    expected: Mapping[str, Tensor], state: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Add the ``num_batches_tracked`` buffers a checkpoint from an older PyTorch lacks, as 0
    (what ``nn.BatchNorm`` itself does on loading), when the rest of that batch norm is there."""
    missing = [
        key
        for key in expected
        if key.endswith("num_batches_tracked")
        and key not in state
        and key.replace("num_batches_tracked", "running_mean") in state
    ]
    if not missing:
        return state
    return {**state, **{key: torch.zeros_like(expected[key]) for key in missing}}


def _shape_pairs(
    expected: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> list[tuple[str, str]] | None:
    """``(checkpoint key, model key)`` for the unmatched keys when their shapes match one to one
    in order, else ``None``."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if not missing or len(missing) != len(unexpected):
        return None
    pairs = list(zip(unexpected, missing))
    if any(state[old].shape != expected[new].shape for old, new in pairs):
        return None
    return pairs


def proposed_key_map(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The prefix renames that turn each checkpoint key into its paired model key (their
    common ending removed)."""
    key_map: dict[str, str] = {}
    for old, new in pairs:
        old_parts, new_parts = old.split("."), new.split(".")
        while len(old_parts) > 1 and len(new_parts) > 1 and old_parts[-1] == new_parts[-1]:
            old_parts, new_parts = old_parts[:-1], new_parts[:-1]
        old_prefix, new_prefix = ".".join(old_parts) + ".", ".".join(new_parts) + "."
        if old_prefix == old + "." or key_map.get(old_prefix, new_prefix) != new_prefix:
            old_prefix, new_prefix = old, new  # a whole key, or a prefix renamed two ways
        key_map[old_prefix] = new_prefix
    return key_map


def _pair_by_shapes(
    expected: Mapping[str, Tensor],
    state: dict[str, Tensor],
    source: str,
    log: Callable[[str], None] | None,
) -> dict[str, Tensor]:
    pairs = _shape_pairs(expected, state)
    if pairs is None:
        return state  # nothing to pair, or no one-to-one match: the mismatch error follows
    for old, new in pairs:
        if log is not None:
            log(f"{source}: {old} -> {new} (matched by shape {_shape(state[old])})")
    renamed = dict(pairs)
    return {renamed.get(key, key): value for key, value in state.items()}


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
        pairs = _shape_pairs(expected, given)
        if pairs is not None:
            problems.append(
                f"their shapes match one to one in order: load with key_map "
                f"{proposed_key_map(pairs)} (teacher.key_map), or teacher.match: shapes"
            )
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
