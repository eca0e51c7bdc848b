"""The compiled fused kernels (``run.compile: true``) give the values and gradients of the
op-by-op quantizer definitions; without a working compiler they fall back to eager."""

import logging
import shutil

import pytest
import torch

from sqakd.quant import build_quantizer, kernels
from sqakd.quant.base import broadcast_channels, round_ste
from sqakd.quant.methods.ewgs import ewgs_round


def ewgs_reference(q, x):
    return ewgs_round(q.normalise(x), q.num_steps, q.delta)


def lsq_reference(q, x):
    step, shift = q.step_and_shift(q.gradient_scale(x))
    step = broadcast_channels(step, x, q.channel_axis)
    shift = broadcast_channels(shift, x, q.channel_axis)
    qmin, qmax = q.code_range
    return round_ste(torch.clamp((x - shift) / step, qmin, qmax)) * step + shift


def outputs_and_grads(q, x, upstream, fn):
    x = x.detach().clone().requires_grad_()
    out = fn(q, x)
    return [out.detach(), *torch.autograd.grad(out, [x, *q.parameters()], upstream)]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")
def test_compiled_kernels_match_the_definitions():
    torch.manual_seed(0)
    cases = [
        (build_quantizer("ewgs", 4, "activation", delta=0.05), torch.relu(torch.randn(4, 3, 6, 6)), ewgs_reference),
        (build_quantizer("lsq", 3, "weight", per_channel=True), torch.randn(5, 3, 3, 3), lsq_reference),
    ]  # fmt: skip
    kernels.use_compiled_kernels(True)
    try:
        for quantizer, x, reference in cases:
            quantizer.calibrate(x)
            upstream = torch.randn(x.shape)
            compiled = outputs_and_grads(quantizer, x, upstream, lambda q, inp: q(inp))
            assert kernels.compiled_kernels_enabled(), "torch.compile failed; fell back to eager"
            expected = outputs_and_grads(quantizer, x, upstream, reference)
            torch.testing.assert_close(compiled[0], expected[0], rtol=0, atol=1e-6)
            for got, want in zip(compiled[1:], expected[1:]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        kernels.use_compiled_kernels(False)


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken(function, **options):
        def fails(*args):
            raise RuntimeError("no compiler here")

        return fails

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "_compiled", {})
    quantizer = build_quantizer("ewgs", 2, "activation")
    x = torch.rand(2, 3, 4, 4)
    quantizer.calibrate(x)
    expected = quantizer(x)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("sqakd").addHandler(handler)
    kernels.use_compiled_kernels(True)
    try:
        torch.testing.assert_close(quantizer(x), expected)
        assert not kernels.compiled_kernels_enabled()
        assert any("using the eager kernels" in message for message in messages)
    finally:
        kernels.use_compiled_kernels(False)
        logging.getLogger("sqakd").removeHandler(handler)


def test_compiled_kernels_see_plain_tensors_never_parameters(monkeypatch):
    """A Parameter and a Tensor need separate compiled graphs (torch._dynamo guards on the type),
    which exhausted the recompile limit in a real model; weights now arrive detached."""
    seen = []

    def fake_kernel(*args):
        seen.extend(type(a) for a in args if isinstance(a, torch.Tensor))
        return kernels._lsq_forward(*args)

    monkeypatch.setattr(kernels, "_use_compiled", True)
    monkeypatch.setitem(kernels._compiled, "lsq_forward", fake_kernel)
    q = build_quantizer("lsq", 4, "weight")
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    q.calibrate(weight)
    q(weight)
    assert seen and all(kind is torch.Tensor for kind in seen)


@pytest.mark.parametrize(
    "setting, device, compiler, expected",
    [
        (True, "cpu", False, True),  # asked for: tried (falls back with a warning if it fails)
        (False, "cpu", True, False),
        ("auto", "cpu", True, True),
        ("auto", "cpu", False, False),  # no C++ compiler: eager, no failed build
        ("auto", "cuda", True, False),  # the compiled kernels are untested off the CPU
    ],
)
def test_run_compile_setting_resolves(monkeypatch, setting, device, compiler, expected):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/g++" if compiler else None)
    assert kernels.should_compile_kernels(setting, torch.device(device)) is expected


def test_cxx_from_the_environment_counts(monkeypatch):
    monkeypatch.setenv("CXX", "my-cxx")
    monkeypatch.setattr(
        kernels.shutil, "which", lambda name: "/opt/my-cxx" if name == "my-cxx" else None
    )
    assert kernels.cpp_compiler_found()
