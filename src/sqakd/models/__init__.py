"""The architectures the papers use, in a registry by name, and safe checkpoint loading.

``build_model("resnet20", num_classes=10)`` builds a registered network;
``build_model("my_pkg.nets:build", ...)`` imports the user's own builder.
``model_stages("resnet20")`` gives a registered model's stage names, the modules to tap.
"""

# importing the architecture files registers them
from . import mobilenetv2, resnet, resnet_cifar, shufflenetv2, small_cnn, squeezenet, vgg  # noqa: F401
from .loading import load_weights, normalise_state_dict, read_state_dict
from .registry import (
    available_models,
    build_model,
    model_stages,
    register_model,
    residual_bodies,
    resolve_tap_names,
)

__all__ = [
    "available_models",
    "build_model",
    "load_weights",
    "model_stages",
    "normalise_state_dict",
    "read_state_dict",
    "register_model",
    "residual_bodies",
    "resolve_tap_names",
]
