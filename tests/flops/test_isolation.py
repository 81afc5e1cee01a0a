"""Building the FLOP engine leaves the training run's state alone: random generators, real tensors,
user hooks and memory."""

from __future__ import annotations

import functools
import random
import types
from typing import Any

import numpy
import pytest
import torch
from torch import nn

from mfu_callbacks.flops import FlopEngine, ModelIntrospectionError
from mfu_callbacks.flops.meta_copy.replica import build_replica
from tests.conftest import HookSpy, step_truth


class StochasticDepthNet(nn.Module):
    """Draws from every global generator in its forward, like stochastic depth or layerdrop does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 32)

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            skip = torch.rand(()) < 0.1  # torch's CPU generator (read on the host by real code)
            skip = bool(random.random() < 0.1) or bool(numpy.random.rand() < 0.1) or skip.numel() == 0
            hidden = hidden if skip else hidden + layer(hidden)
        return self.head(hidden).float().sum()


def _batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 32, (2, 6))}


def test_every_global_generator_is_left_as_it_was():
    model = StochasticDepthNet()
    batch = _batch()
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    expected = (torch.rand(4), random.random(), numpy.random.rand())
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    FlopEngine.from_model(model, batch)
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert numpy.random.rand() == expected[2]


def test_probes_see_meta_tensors_only_and_never_touch_real_ones():
    seen: list[str] = []

    def forward(model: nn.Module, batch: dict) -> torch.Tensor:
        for tensor in (batch["inputs"]["input_ids"], batch["extra"][0], batch["extra"][1]["scale"]):
            seen.append(tensor.device.type)
        batch["extra"][0].add_(1)  # a forward that writes into its batch
        batch["extra"][1]["scale"].mul_(2)
        return model(batch["inputs"]["input_ids"])

    model = StochasticDepthNet()
    real = {"inputs": _batch(), "extra": [torch.zeros(2, 6), {"scale": torch.ones(2)}]}
    FlopEngine.from_model(model, real, forward=forward, token_counter=lambda batch: batch["inputs"])
    assert seen and set(seen) == {"meta"}
    assert torch.equal(real["extra"][0], torch.zeros(2, 6))
    assert torch.equal(real["extra"][1]["scale"], torch.ones(2))


def test_user_hooks_do_not_run_on_the_copy():
    calls: list[str] = []
    model = StochasticDepthNet()
    model.layers[0].register_forward_hook(lambda module, args, output: calls.append("hook"))
    model.register_forward_pre_hook(lambda module, args: calls.append("pre-hook"))
    FlopEngine.from_model(model, _batch())
    assert calls == []
    model(**_batch())
    assert calls == ["pre-hook", "hook"], "the user's model keeps its hooks"


def test_no_user_hook_of_any_kind_sees_the_probes_and_a_monitor_that_reads_values_still_builds():
    model = StochasticDepthNet()
    spy = HookSpy()
    spy.attach(model, model.layers[0], model.head)
    with spy:
        FlopEngine.from_model(model, _batch())
        assert spy.meta_calls == 0 and spy.calls == 0
        model(**_batch()).backward()
    assert spy.calls > 0 and spy.meta_calls == 0, "the user's model keeps every hook, global ones too"


def test_hooks_of_the_model_libraries_registered_for_every_module_still_run_on_the_copy():
    from torch.nn.modules import module as torch_module

    from mfu_callbacks.flops.meta_copy import replica

    seen: list[str] = []

    def library_hook(module, args):
        seen.append(args[0].device.type if args and isinstance(args[0], torch.Tensor) else "")

    library_hook.__module__ = "transformers.fake_integration"
    handle = torch_module.register_module_forward_pre_hook(library_hook)
    try:
        assert replica.is_model_library_hook(library_hook)
        FlopEngine.from_model(StochasticDepthNet(), _batch())
    finally:
        handle.remove()
    assert "meta" in seen


class Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def through_both(self: Doubled, x: torch.Tensor) -> torch.Tensor:
    return self.other(self.inner(x))


@pytest.mark.parametrize("length", [5, 9])
def test_a_forward_bound_to_the_instance_runs_on_the_copy(length):
    model = Doubled()
    model.forward = types.MethodType(through_both, model)
    batch = (torch.randn(2, length, 8),)
    estimate = FlopEngine.from_model(model, batch).estimate(batch)
    assert estimate.model_flops == step_truth(model, batch, lambda m, b: m(b[0]).sum())


@pytest.mark.slow  # torch.compile's first call imports dynamo: about 2 s
@pytest.mark.parametrize("length", [5, 9])
def test_a_compiled_method_put_on_the_instance_runs_uncompiled_on_the_copy(length):
    model = Doubled()
    bound = types.MethodType(through_both, model)
    model.forward = torch.compile(bound)  # the wrapper Lightning puts on a compiled LightningModule's methods
    batch = (torch.randn(2, length, 8),)
    estimate = FlopEngine.from_model(model, batch).estimate(batch)
    assert estimate.model_flops == step_truth(model, batch, lambda m, b: bound(b[0]).sum())


@pytest.mark.parametrize("length", [5, 9])
def test_a_wrapper_bound_around_the_modules_own_method_runs_that_method_on_the_copy(length):
    # FSDP2's register_fsdp_forward_method (the HF Trainer registers "generate"): a function wrapping
    # the module's bound method, bound to the module in its place; the method itself decorated (as
    # generate is, by torch.no_grad), so that unwrapping all the way ends at a plain function.
    model = Doubled()

    def decorated(function: Any) -> Any:
        @functools.wraps(function)
        def call(*args: Any) -> Any:
            return function(*args)

        return call

    model.forward = types.MethodType(decorated(through_both), model)
    original = model.forward

    @functools.wraps(original)
    def wrapped(self: Doubled, *args: Any) -> torch.Tensor:
        return original(*args)

    model.forward = wrapped.__get__(model, type(model))
    batch = (torch.randn(2, length, 8),)
    estimate = FlopEngine.from_model(model, batch).estimate(batch)
    assert estimate.model_flops == step_truth(model, batch, lambda m, b: m(b[0]).sum())


def test_a_forward_closing_over_the_model_is_refused_by_name():
    model = Doubled()
    original = model.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return original(x) * 2

    model.forward = forward
    with pytest.raises(ModelIntrospectionError, match=r"Doubled\.forward"):
        FlopEngine.from_model(model, (torch.randn(2, 5, 8),))


def test_tensors_held_as_plain_attributes_are_not_copied():
    model = StochasticDepthNet()
    model.cache = torch.zeros(1024, 1024)  # neither a parameter nor a buffer
    model.layers[1].table = [torch.ones(256, 256)]
    replica = build_replica(model).module
    assert replica.cache.device.type == "meta" and replica.cache.shape == (1024, 1024)
    assert replica.layers[1].table[0].device.type == "meta"
