"""A frozen teacher made cheap to run: batch norm folded into the convolutions before it.

A frozen teacher in eval mode computes ``BN(conv(x))`` with fixed statistics, which is one
convolution with rescaled weights and a bias. :func:`torch.fx.experimental.optimization.fuse`
does that folding on a symbolically traced copy; the teacher's outputs change only by float
rounding (about 1e-6) and its forward gets cheaper (ResNet-20 on CPU: about 15 % in
``benchmarks/kd_step.py``). A model that torch.fx cannot trace (data-dependent control flow) is
used as it is.
"""

from __future__ import annotations

import copy
import logging

from torch import nn

logger = logging.getLogger("sqakd")


def frozen_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` without gradients, batch norm folded where torch.fx can
    trace it (``model`` itself is not changed)."""
    frozen = copy.deepcopy(model).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules()):
        return frozen
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(frozen)
    except Exception as error:  # noqa: BLE001 - any tracing failure: keep the plain model
        logger.debug("teacher kept unfused (torch.fx could not trace it: %s)", error)
        return frozen
