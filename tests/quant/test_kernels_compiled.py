"""The compiled fused kernels (``run.compile: true``) give the values and gradients of the
op-by-op quantizer definitions; the choice is per model (two models in one process may differ),
and a kernel that fails to compile falls back to eager alone."""

import logging
import shutil

import pytest
import torch
from torch import nn

from sqakd.quant import (
    QuantPolicy,
    build_quantizer,
    calibrate,
    describe,
    kernels,
    prepare,
    set_compiled_kernels,
    uses_compiled_kernels,
)
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
    for quantizer, x, reference in cases:
        set_compiled_kernels(quantizer, True)
        quantizer.calibrate(x)
        upstream = torch.randn(x.shape)
        compiled = outputs_and_grads(quantizer, x, upstream, lambda q, inp: q(inp))
        assert not kernels.failed_kernels(), "torch.compile failed; fell back to eager"
        expected = outputs_and_grads(quantizer, x, upstream, reference)
        torch.testing.assert_close(compiled[0], expected[0], rtol=0, atol=1e-6)
        for got, want in zip(compiled[1:], expected[1:]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class FakeCompiler:
    """``torch.compile`` stand-in: the "compiled" function runs the eager formula and records
    its name (``ewgs_forward``, ...) and argument types; the names in ``broken`` raise instead,
    as a failed build does on the first call."""

    def __init__(self, broken: tuple[str, ...] = ()) -> None:
        self.broken, self.calls, self.argument_types = broken, [], []

    def __call__(self, function, **options):
        name = function.__name__.lstrip("_")

        def compiled(*args):
            if name in self.broken:
                raise RuntimeError("no compiler here")
            self.calls.append(name)
            self.argument_types.extend(type(a) for a in args if isinstance(a, torch.Tensor))
            return function(*args)

        return compiled


@pytest.fixture
def fake_compiler(monkeypatch):
    """Install a :class:`FakeCompiler` (``fake_compiler.broken = (...)`` to break kernels), with
    the compiled-kernel cache empty before and after the test."""
    compiler = FakeCompiler()
    monkeypatch.setattr(torch, "compile", compiler)
    kernels.clear_kernel_cache()
    yield compiler
    kernels.clear_kernel_cache()


@pytest.fixture
def warnings_logged():
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("sqakd").addHandler(handler)
    yield messages
    logging.getLogger("sqakd").removeHandler(handler)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


#: LSQ weights and EWGS activations: two compiled kernels in one model
POLICY = QuantPolicy(method="ewgs", weight_method="lsq", weight_bits=4, act_bits=4)


def prepared_pair(images):
    """The same network prepared twice, compiled and eager, both calibrated on ``images``."""
    net = small_net()
    compiled = prepare(net, POLICY, compiled_kernels=True)
    eager = prepare(net, POLICY)
    calibrate(compiled, [images])
    calibrate(eager, [images])
    return compiled.train(), eager.train()


def training_step(model, images, labels):
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in model.parameters())]


def test_prepare_runs_eager_unless_asked():
    model = prepare(small_net(), POLICY)
    assert not uses_compiled_kernels(model)
    assert describe(model).kernels == "eager"
    set_compiled_kernels(model, True)
    assert uses_compiled_kernels(model)
    assert str(describe(model)).endswith("quantizer kernels: compiled")


def test_two_models_in_one_process_run_their_own_kernels(fake_compiler):
    images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    compiled, eager = prepared_pair(images)
    assert uses_compiled_kernels(compiled) and not uses_compiled_kernels(eager)
    assert (describe(compiled).kernels, describe(eager).kernels) == ("compiled", "eager")
    for _ in range(2):  # interleaved: neither model changes the other's kernels
        fake_compiler.calls.clear()
        compiled_step = training_step(compiled, images, labels)
        assert set(fake_compiler.calls) == {
            "ewgs_forward", "ewgs_backward", "lsq_forward", "lsq_backward",
        }  # fmt: skip
        fake_compiler.calls.clear()
        eager_step = training_step(eager, images, labels)
        assert fake_compiler.calls == []
        for got, want in zip(compiled_step, eager_step):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_compile_failure_falls_back_for_that_kernel_only(fake_compiler, warnings_logged):
    fake_compiler.broken = ("ewgs_forward",)
    images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    compiled, eager = prepared_pair(images)  # calibrating runs the forwards: EWGS fails here
    for _ in range(2):
        fake_compiler.calls.clear()
        compiled_step = training_step(compiled, images, labels)
        assert set(fake_compiler.calls) == {"lsq_forward", "lsq_backward"}  # LSQ stays compiled
        for got, want in zip(compiled_step, training_step(eager, images, labels)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert kernels.failed_kernels() == {"ewgs"}
    assert uses_compiled_kernels(compiled)  # the model still asks; only EWGS could not comply
    failures = [m for m in warnings_logged if "could not build" in m]
    assert len(failures) == 1 and "ewgs_forward" in failures[0] and "runs eagerly" in failures[0]


def test_a_failing_compiler_falls_back_to_eager(fake_compiler, warnings_logged):
    fake_compiler.broken = ("ewgs_forward", "ewgs_backward")
    quantizer = build_quantizer("ewgs", 2, "activation")
    x = torch.rand(2, 3, 4, 4)
    quantizer.calibrate(x)
    expected = quantizer(x)
    set_compiled_kernels(quantizer, True)
    torch.testing.assert_close(quantizer(x), expected)
    torch.testing.assert_close(quantizer(x), expected)
    assert kernels.failed_kernels() == {"ewgs"}
    assert sum("runs eagerly" in message for message in warnings_logged) == 1


def test_compiled_kernels_see_plain_tensors_never_parameters(fake_compiler):
    """A Parameter and a Tensor need separate compiled graphs (torch._dynamo guards on the type),
    which exhausted the recompile limit in a real model; weights now arrive detached."""
    q = build_quantizer("lsq", 4, "weight")
    set_compiled_kernels(q, True)
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    q.calibrate(weight)
    q(weight)
    assert "lsq_forward" in fake_compiler.calls
    assert fake_compiler.argument_types
    assert all(kind is torch.Tensor for kind in fake_compiler.argument_types)


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
