"""Packed low-bit weights: the deployable size of a quantized model, in one safetensors file.

Each quantized layer's weight is stored as its integer codes, shifted to ``u = code - qmin`` and
bit-packed ``width`` bits per code (``width = bits`` for the usual grids) into uint8 bytes, first
code in the lowest bits: two 4-bit codes per byte, eight 1-bit codes per byte, and a code that
straddles a byte boundary for widths that do not divide 8 (3, 5, 6, 7). The layer's grid
(scale, zero point, levels for non-uniform grids) is stored beside the codes, and everything
else the model holds (float layers, batch norm, biases, quantizer parameters) as ordinary
tensors. Per-layer facts (bits, qmin, shape, axis, method, a SHA-256 of the quantized weight) go
into the JSON metadata.

Loading rebuilds, for each packed layer, a float weight whose fake-quantized value is *exactly*
the one that was saved (checked against the SHA-256): the quantizer itself recomputes it, so
the loaded model's outputs are bit-identical to the saved model's. The candidate weights tried,
in order, using only the grid contract: the centre of each code's input bin
(``input_scale * (code - input_zero_point)``), the dequantized value ``grid.dequantize(code)``,
and a per-element bisection between the grid's extreme values for quantizers whose codes depend
on statistics of the whole weight (DoReFa's ``max|tanh(w)|``). Quantizers that recompute a
statistic of the whole weight in their forward (binary/ternary ``mean|w|``, minmax's range) can
reproduce the codes but not the last float bit from any rebuilt weight; for those the exact saved
values (the grid's dequantized codes) are pinned on the layer until its weight next changes
(:meth:`~sqakd.quant.layers.QuantizedLayer.pin_quantized_weight`). The float weights that
training would continue from are not stored: a packed model is for inference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..quant import QuantGrid, QuantizedLayer, Quantizer, quantized_layers, quantizers
from ..quant.deployed import check_calibrated, weight_codes
from ..quant.grid import broadcast_channels, codes_of_values, integer_weight, weight_form
from ..quant.integer_sums import IntegerWeight

FORMAT = "sqakd.packed/1"
METADATA_KEY = "sqakd"
CODES, SCALE, ZERO_POINT, LEVELS = ".codes", ".scale", ".zero_point", ".levels"
BISECTION_STEPS = 48


# ----------------------------------------------------------------------------------- bit packing
def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack non-negative integers below ``2**width`` into uint8 bytes, ``width`` bits each,
    least significant bit first (value i occupies stream bits ``i*width .. i*width+width-1``)."""
    if not 1 <= width <= 8:
        raise ValueError(f"bit width must be 1..8, got {width}")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**width):
        raise ValueError(f"values must lie in 0..{2**width - 1} to pack them in {width} bits")
    bits = ((flat.unsqueeze(1) >> torch.arange(width)) & 1).reshape(-1)
    padding = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(padding)]).reshape(-1, 8)
    return (bits << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, width: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values (int64)."""
    if packed.numel() * 8 < count * width:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {width} bits")
    bits = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    bits = bits[: count * width].reshape(count, width)
    return (bits << torch.arange(width)).sum(dim=1)


def code_width(grid: QuantGrid) -> int:
    """Bits per stored code: enough for ``qmax - qmin`` (equals ``grid.bits`` for usual grids)."""
    return max(1, (grid.qmax - grid.qmin).bit_length())


# --------------------------------------------------------------------------------- saving
@dataclass(frozen=True)
class SizeReport:
    """Bytes of the model stored in float32 vs packed.

    ``float32_bytes``: every tensor of the float model (weights, biases, batch-norm state), 4 bytes
    per float. ``packed_bytes``: every tensor :func:`save_packed` writes (codes, grids, the float
    remainder, quantizer parameters). ``ratio = float32_bytes / packed_bytes`` (how many times
    smaller). The ``quantized_weight_*`` pair counts only the weights of packed layers
    (float32 vs codes), so ``weight_ratio`` is the ideal 32 / bits when every layer is packed.
    """

    float32_bytes: int
    packed_bytes: int
    ratio: float
    quantized_weight_float32_bytes: int = 0
    quantized_weight_packed_bytes: int = 0

    @property
    def weight_ratio(self) -> float:
        return self.quantized_weight_float32_bytes / max(self.quantized_weight_packed_bytes, 1)

    def __str__(self) -> str:
        return (
            f"float32 {self.float32_bytes:,} bytes -> packed {self.packed_bytes:,} bytes "
            f"({self.ratio:.2f}x smaller; quantized weights alone {self.weight_ratio:.2f}x)"
        )


def _digest(values: Tensor) -> str:
    """SHA-256 of the values' float32 bytes; ``+ 0.0`` makes -0.0 and 0.0 one value (the same
    number, which a code of 0 rebuilds as +0.0)."""
    canonical = values.detach().float() + 0.0
    return hashlib.sha256(canonical.contiguous().numpy().tobytes()).hexdigest()


def _packable(layer: QuantizedLayer) -> bool:
    return layer.weight_quantizer is not None and layer.quantization_enabled


def _pack_model(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict[str, object]]]:
    """The tensors and per-layer records :func:`save_packed` writes."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            "the model has no quantized layer; run `sqakd quantize` first, or "
            "sqakd.prepare(model, policy) and sqakd.calibrate(...) before packing"
        )
    tensors: dict[str, Tensor] = {}
    records: dict[str, dict[str, object]] = {}
    for name, layer in layers:
        if not _packable(layer):
            continue
        check_calibrated(name, layer)
        quantizer = layer.weight_quantizer
        assert quantizer is not None
        codes, values = weight_codes(quantizer, layer.weight)
        grid = quantizer.grid()
        width = code_width(grid)
        key = f"{name}.weight" if name else "weight"
        tensors[key + CODES] = pack_bits(codes.to(torch.int64) - grid.qmin, width)
        tensors[key + SCALE] = grid.scale.detach().float().clone()
        tensors[key + ZERO_POINT] = grid.zero_point.detach().float().clone()
        if grid.levels is not None:
            tensors[key + LEVELS] = grid.levels.detach().float().clone()
        records[key] = {
            "method": quantizer.method,
            "bits": grid.bits,
            "width": width,
            "qmin": grid.qmin,
            "qmax": grid.qmax,
            "shape": list(codes.shape),
            "axis": grid.axis,
            "sha256": _digest(values),
        }
    replaced = _replaced_keys(layers)
    for key, tensor in model.state_dict().items():
        if key not in records and key not in replaced:
            tensors[key] = tensor.detach().contiguous().clone()
    return tensors, records


def _replaced_keys(layers: list[tuple[str, QuantizedLayer]]) -> set[str]:
    """The ``state_dict`` keys of float weights that the packed codes replace: those whose
    every layer is packed (an attention's ``in_proj_weight`` holds three layers' weights, and
    stays float when one of them does)."""
    packed: dict[str, bool] = {}
    for name, layer in layers:
        key = layer.weight_key(name)
        packed[key] = packed.get(key, True) and _packable(layer)
    return {key for key, every in packed.items() if every}


def save_packed(model: nn.Module, path: str | Path) -> SizeReport:
    """Write ``model`` (prepared and calibrated) to ``path`` as a packed safetensors file and
    return its size report. The model is not changed."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output folder {path.parent} does not exist; create it first")
    tensors, records = _pack_model(model)
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "layers": records})}
    save_file(tensors, str(path), metadata=metadata)
    return _size_report(model, tensors, records)


def packed_size(model: nn.Module) -> SizeReport:
    """The sizes :func:`save_packed` would give, without writing a file."""
    tensors, records = _pack_model(model)
    return _size_report(model, tensors, records)


def _size_report(
    model: nn.Module, tensors: dict[str, Tensor], records: dict[str, dict[str, object]]
) -> SizeReport:
    quantizer_prefixes = tuple(f"{name}." for name, _ in quantizers(model))
    flags = {f"{name}.calibrated" for name, _ in quantized_layers(model)}
    float_bytes = 0
    for key, tensor in model.state_dict().items():
        if key.startswith(quantizer_prefixes) or key in flags:
            continue
        size = 4 if tensor.is_floating_point() else tensor.element_size()
        float_bytes += tensor.numel() * size
    packed = sum(t.numel() * t.element_size() for t in tensors.values())
    return SizeReport(
        float32_bytes=float_bytes,
        packed_bytes=packed,
        ratio=float_bytes / packed,
        quantized_weight_float32_bytes=sum(4 * math.prod(r["shape"]) for r in records.values()),
        quantized_weight_packed_bytes=sum(tensors[key + CODES].numel() for key in records),
    )


# --------------------------------------------------------------------------------- loading
def load_packed(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by :func:`save_packed` into ``model`` (prepared with the same policy as
    the saved one) and return it. Its fake-quantized outputs are then bit-identical to those of
    the saved model; a layer for which that could not be reached is named in a warning."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"packed file {path} not found; write it with save_packed first")
    with safe_open(str(path), framework="pt") as handle:
        header = (handle.metadata() or {}).get(METADATA_KEY)
    info = json.loads(header) if header else {}
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file; write it with save_packed")
    records: dict[str, dict] = info["layers"]
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    for key, record in records.items():
        _check_layer(modules, key, record)
    grid_keys = {key + part for key in records for part in (CODES, SCALE, ZERO_POINT, LEVELS)}
    state = {key: value for key, value in tensors.items() if key not in grid_keys}
    _check_keys(model, state, set(records) | _replaced_keys(quantized_layers(model)))
    model.load_state_dict(state, strict=False)
    pins = []
    for key, record in records.items():
        layer = modules[key.removesuffix("weight").removesuffix(".")]
        assert isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None
        count = 1
        for size in record["shape"]:
            count *= size
        codes = unpack_bits(tensors[key + CODES], record["width"], count) + record["qmin"]
        codes = codes.reshape(record["shape"]).to(layer.weight.dtype)
        with torch.no_grad():
            saved = (tensors[key + SCALE], tensors[key + ZERO_POINT])
            weight, pin = _rebuild_weight(layer, key, codes, record, saved)
            layer.weight.copy_(weight)
        if pin is not None:
            pins.append((layer, pin))
    # pinned after every copy: the attention's projections share one parameter (and so one
    # version counter), and a copy into one would drop the pin of another
    for layer, (values, integer) in pins:
        layer.pin_quantized_weight(values, integer)
    return model


def _check_layer(modules: dict[str, nn.Module], key: str, record: dict) -> None:
    name = key.removesuffix("weight").removesuffix(".")
    layer = modules.get(name)
    quantizer = layer.weight_quantizer if isinstance(layer, QuantizedLayer) else None
    if quantizer is None or (quantizer.method, quantizer.bits) != (
        record["method"],
        record["bits"],
    ):
        found = f"{quantizer.method} W{quantizer.bits}" if quantizer else "no weight quantizer"
        raise ValueError(
            f"layer {name!r} was packed as {record['method']} W{record['bits']} but the model has "
            f"{found}; prepare the model with the policy it was saved with"
        )
    if list(layer.weight.shape) != record["shape"]:
        raise ValueError(
            f"layer {name!r} has weight shape {list(layer.weight.shape)} but the file holds "
            f"{record['shape']}; load into the architecture it was saved from"
        )


def _check_keys(model: nn.Module, state: dict[str, Tensor], packed: set[str]) -> None:
    expected = set(model.state_dict()) - packed
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the packed file does not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); prepare the model with the policy it was saved with"
        )


@torch.no_grad()
def _rebuild_weight(
    layer: QuantizedLayer, key: str, codes: Tensor, record: dict, saved: tuple[Tensor, Tensor]
) -> tuple[Tensor, tuple[Tensor, IntegerWeight | None] | None]:
    """A float weight whose fake-quantized value has the saved SHA-256 (see the module doc),
    and what to pin once it is in place, or ``None``.

    When the quantizer's forward is not a function of the codes alone (it recomputes a statistic
    of the whole weight, like ``mean|w|``), the rebuilt weight reproduces the codes but not the
    last float bits; the exact saved values, the grid's dequantized codes, and their integer
    form are then to be pinned on the layer (:meth:`QuantizedLayer.pin_quantized_weight`) until
    the weight changes."""
    quantizer = layer.weight_quantizer
    assert quantizer is not None
    grid = quantizer.grid()
    fallback = None
    for candidate in _candidates(quantizer, grid, codes):
        values = quantizer(candidate)
        if _digest(values) == record["sha256"]:
            return candidate, None
        if fallback is None and torch.equal(codes_of_values(values, grid), codes):
            fallback = candidate
    if fallback is None:
        raise ValueError(
            f"could not rebuild the weight of {key!r} from its codes with the "
            f"{quantizer.method!r} quantizer; the file may be damaged"
        )
    quantizer(fallback)  # leave any state the forward keeps consistent with the chosen weight
    exact = grid.dequantize(codes)
    if _digest(exact) == record["sha256"]:
        # the saved model's integer form, exactly: the codes on the saved scale and zero point
        form = weight_form(codes, dataclasses.replace(grid, scale=saved[0], zero_point=saved[1]))
        integer = None if isinstance(form, str) else integer_weight(form, exact.dtype)
        return fallback, (exact, integer)
    warnings.warn(
        f"{key}: the codes are restored but the quantized values differ from the saved ones in "
        f"the last bits (the {quantizer.method!r} forward is not a function of the codes alone)",
        stacklevel=3,
    )
    return fallback, None


def _candidates(quantizer: Quantizer, grid: QuantGrid, codes: Tensor):  # type: ignore[no-untyped-def]
    axis = quantizer.channel_axis
    input_scale = broadcast_channels(grid.input_scale, codes, axis)
    input_zero = broadcast_channels(grid.input_zero_point, codes, axis)
    yield input_scale * (codes - input_zero)
    dequantized = grid.dequantize(codes)
    yield dequantized
    yield _bisect(quantizer, grid, codes, dequantized)


def _bisect(quantizer: Quantizer, grid: QuantGrid, codes: Tensor, start: Tensor) -> Tensor:
    """Per-element bisection for quantizers whose codes depend on the whole weight through its
    extreme values: elements on the end codes (qmin, qmax) stay at their dequantized values, the
    others search between their channel's smallest and largest dequantized value."""
    axis = grid.axis if grid.axis is not None else None
    if axis is None:
        low = start.min().expand_as(start).clone()
        high = start.max().expand_as(start).clone()
    else:
        moved = start.movedim(axis, 0).reshape(start.shape[axis], -1)
        low = broadcast_channels(moved.min(dim=1).values, start, axis).expand_as(start).clone()
        high = broadcast_channels(moved.max(dim=1).values, start, axis).expand_as(start).clone()
    fixed = (codes == grid.qmin) | (codes == grid.qmax)
    current = start.clone()
    for _ in range(BISECTION_STEPS):
        middle = torch.where(fixed, start, (low + high) / 2)
        found = codes_of_values(quantizer(middle), grid)
        low = torch.where(~fixed & (found < codes), middle, low)
        high = torch.where(~fixed & (found > codes), middle, high)
        current = torch.where(found == codes, middle, current)
        fixed = fixed | (found == codes)
        start = torch.where(found == codes, middle, start)
    return current
