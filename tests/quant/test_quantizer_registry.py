"""Quantizer registry: names resolve to classes; unknown names list the known ones."""

import pytest

from sqakd.quant import available_quantizers, build_quantizer, register_quantizer
from sqakd.quant.base import Quantizer
from sqakd.quant.methods.lsq import LSQPlusQuantizer, LSQQuantizer


def test_uniform_methods_are_registered_by_name():
    names = available_quantizers()
    for name in ("dorefa", "ewgs", "lsq", "lsq+", "pact", "ste"):
        assert name in names
    assert type(build_quantizer("lsq", 4, "weight")) is LSQQuantizer
    assert type(build_quantizer("lsq+", 4, "activation")) is LSQPlusQuantizer
    assert build_quantizer("pact", 3, "activation").method == "pact"


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown quantization method 'lsqq'") as error:
        build_quantizer("lsqq", 4, "weight")
    for name in available_quantizers():
        assert name in str(error.value)


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register_quantizer("lsq")(type("Again", (Quantizer,), {}))
