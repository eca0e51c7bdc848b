"""The integer forms that the ONNX export and the packed format store.

They belong to :mod:`sqakd.quant` (quantized layers compute with them in inference too), in
:mod:`sqakd.quant.grid` (grids, containers, weight and activation forms) and
:mod:`sqakd.quant.deployed` (a quantizer's weight codes and deployed weight). This module names
them again for export code and for callers of the earlier ``sqakd.export.integer`` path.
"""

from ..quant.deployed import check_calibrated, deployed_weight, weight_codes
from ..quant.grid import (
    ACTIVATION_CONTAINERS,
    CONTAINERS,
    WEIGHT_CONTAINERS,
    ActivationForm,
    WeightForm,
    activation_form,
    codes_of_values,
    integer_weight,
    pick_container,
    weight_form,
)

__all__ = [
    "ACTIVATION_CONTAINERS",
    "CONTAINERS",
    "WEIGHT_CONTAINERS",
    "ActivationForm",
    "WeightForm",
    "activation_form",
    "check_calibrated",
    "codes_of_values",
    "deployed_weight",
    "integer_weight",
    "pick_container",
    "weight_codes",
    "weight_form",
]
