"""Checkpoints that never destroy the last good one, and that load without executing code."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def atomic_torch_save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to a temporary file in the same folder, fsync it, then rename over ``path``.

    The previous file at ``path`` is first kept as ``<name>.prev`` so that a crash between the
    two renames still leaves one complete checkpoint; the folder is fsynced after the renames.
    A crash (even SIGKILL) while writing leaves only a ``.<name>.*.tmp`` file, which is never
    read and is removed by the next save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        raise _as_write_error(error, path) from None
    _fsync_folder(path.parent)
    return path


#: below this much free space, a failed write is taken for a full disk
LOW_SPACE_BYTES = 64 * 2**20


def _as_write_error(error: BaseException, path: Path) -> BaseException:
    """torch's and safetensors' writers report a full disk as ``unexpected pos ...`` or their
    own error types: name it as the ``OSError`` it is (``ENOSPC``), so the user reads "no space
    left on the device"; any other error is returned unchanged."""
    if isinstance(error, OSError) or not isinstance(error, Exception):
        return error
    try:
        low = shutil.disk_usage(path.parent).free < LOW_SPACE_BYTES
    except OSError:
        low = False
    if low or "unexpected pos" in str(error) or "No space left" in str(error):
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return error


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def safe_torch_load(path: str | Path) -> dict[str, Any]:
    """``torch.load`` that refuses to execute code (``weights_only=True``), with readable errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        raise ValueError(
            f"checkpoint {path} cannot be read safely ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "it is truncated, corrupt or not a plain weights file"
        ) from None


def load_training_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Load ``path``; if it is truncated or corrupt, fall back to ``<name>.prev`` and say so."""
    path = Path(path)
    try:
        return safe_torch_load(path), path
    except ValueError as first_error:
        previous = path.with_name(path.name + ".prev")
        if not previous.is_file():
            raise
        logging.getLogger("sqakd").warning(
            "%s; using the previous checkpoint %s", first_error, previous
        )
        return safe_torch_load(previous), previous


def save_weights(
    model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """The model's ``state_dict`` as safetensors (tensors only: loads anywhere without pickle),
    with string ``metadata`` (e.g. the quantization plan it was trained with)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    temp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(temp), metadata=dict(metadata) if metadata else None)
        os.replace(temp, path)
    except Exception as error:
        temp.unlink(missing_ok=True)
        raise _as_write_error(error, path) from None
    return path


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``{}`` for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the weights' loader
        return {}


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ------------------------------------------------------------------------------ random states
def capture_rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's (and CUDA's) global random states, as plain tensors and
    numbers (so the checkpoint still loads with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the next random draw is the one that followed the capture."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
