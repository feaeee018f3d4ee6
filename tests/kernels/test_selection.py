"""``engine.select``: the one place an engine is chosen, by what engines say they can do.

Fake engines registered here claim a capability (a higher ``auto_rank`` on this device, a
one-pass loss, autograd-native rows, unsuitable hardware) and are seen chosen, or passed over,
for that reason alone."""

from __future__ import annotations

import warnings

import pytest
import torch

import gft_kernels
from gft_kernels import engine as registry
from gft_kernels import validation
from gft_kernels.engine import Capabilities, KernelOptions, get_engine, register_engine, select


class _Wrapping:
    """An engine under another name that runs the chunked engine's math and records its calls."""

    launch_options = None

    def __init__(self, name, capabilities, unsuitable=None):
        self.name, self.capabilities, self.unsuitable = name, capabilities, unsuitable
        self.inner = get_engine("torch")
        self.dtypes = self.inner.dtypes
        self.calls = []

    def supports(self, hidden, options):
        return None

    def suitable(self, hidden, options):
        return self.unsuitable

    def partials(self, request, options):
        self.calls.append("partials")
        return self.inner.partials(request, options)

    def backward(self, request, options):
        self.calls.append("backward")
        return self.inner.backward(request, options)

    def loss_and_grads(self, *args):
        self.calls.append("loss_and_grads")
        return self.inner.loss_and_grads(*args)

    def rows(self, request, options):
        self.calls.append("rows")
        return get_engine("reference").rows(request, options)


@pytest.fixture
def engines(monkeypatch):
    """Registrations undone after the test: the registry's table is the test's own copy."""
    monkeypatch.setattr(registry, "_ENGINES", dict(registry._ENGINES))
    monkeypatch.setattr(validation, "_auto_warned", set())
    return lambda engine: register_engine(engine)


def _problem():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    return hidden, weight, torch.randint(0, 13, (2, 5), generator=g)


def test_auto_takes_a_registered_engine_that_ranks_higher_on_this_device(engines):
    fast = engines(_Wrapping("fast-cpu", Capabilities(auto_rank=50, auto_devices=("cpu",))))
    hidden, weight, targets = _problem()
    choice = select("auto", hidden, KernelOptions())
    assert choice.engine is fast and choice.passed_over is None
    assert "highest-ranked" in choice.reason and "cpu" in choice.reason
    with torch.no_grad():
        gft_kernels.gft_loss(hidden, weight, targets, 1.0)
    gft_kernels.logprobs(hidden, weight, targets).logp.sum().backward()
    assert fast.calls == ["partials", "partials", "backward"]
    # an engine for another device type is not considered here
    engines(_Wrapping("fast-gpu", Capabilities(auto_rank=90, auto_devices=("cuda",))))
    assert select("auto", hidden).engine is fast


def test_auto_passes_over_an_engine_whose_hardware_is_unsuitable_and_says_why_once(engines):
    engines(_Wrapping("picky", Capabilities(auto_rank=50), unsuitable="this board is not one it is checked on"))
    hidden, weight, targets = _problem()
    choice = select("auto", hidden)
    assert choice.engine.name == "torch" and choice.passed_over == "picky"
    assert "not one it is checked on" in choice.reason
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            gft_kernels.gft_loss(hidden, weight, targets, 1.0)
    said = [str(w.message) for w in seen if "uses the chunked torch engine" in str(w.message)]
    assert len(said) == 1 and "not one it is checked on" in said[0] and "backend='picky'" in said[0]
    # named, it runs: suitability is a question of backend="auto" only
    assert select("picky", hidden).engine.name == "picky"


def test_the_one_pass_path_is_taken_by_capability(engines):
    one_pass = engines(_Wrapping("one-pass", Capabilities(one_pass=True)))
    plain = engines(_Wrapping("plain", Capabilities()))
    hidden, weight, targets = _problem()
    for engine in (one_pass, plain):
        gft_kernels.gft_loss(hidden, weight, targets, 1.0, backend=engine.name).backward()
    assert one_pass.calls == ["loss_and_grads"]
    assert plain.calls == ["partials", "backward"]


def test_autograd_rows_are_taken_by_capability(engines):
    rows = engines(_Wrapping("autograd-rows", Capabilities(autograd_rows=True)))
    hidden, weight, targets = _problem()
    gft_kernels.gft_loss(hidden, weight, targets, 1.0, backend=rows.name, reduction="none").sum().backward()
    gft_kernels.logprobs(hidden, weight, targets, backend=rows.name)
    assert rows.calls == ["rows", "rows"]


def test_a_named_engine_that_cannot_run_the_inputs_is_refused_naming_it():
    hidden = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16, float32"):
        select("triton", hidden)
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        select("reference", hidden, KernelOptions(outside=True))


def test_the_registrys_table_of_built_in_auto_engines_matches_their_capabilities():
    """The registry knows the built-ins' rank and devices before importing them (so a CPU
    machine never imports triton for "auto"); what it knows must be what they declare."""
    for name, (rank, devices) in registry._BUILT_IN_AUTO.items():
        caps = get_engine(name).capabilities
        assert (caps.auto_rank, caps.auto_devices) == (rank, devices), name
    for name in registry._BUILT_IN:
        assert (name in registry._BUILT_IN_AUTO) == (registry.capabilities(get_engine(name)).auto_rank is not None)
