"""Declared FLOPs: a kernel no trace can see (here a custom op computing x @ W in numpy) counts what
its declaration says, checked against torch's FlopCounterMode on a twin where it is a plain matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_outputs import CausalLMOutput

from mfu_callbacks import declare_flops
from mfu_callbacks.flops import FlopEngine, ModelIntrospectionError
from mfu_callbacks.flops.declared import declared
from tests.conftest import LENGTHS, VOCAB, assert_flops, full_batch, step_truth

WIDTH = 16


@torch.library.custom_op("mfu_tests::numpy_matmul", mutates_args=())
def numpy_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight computed by numpy: no FLOP counter registers a formula for this op."""
    return torch.from_numpy(x.detach().numpy() @ weight.detach().numpy())


@numpy_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[-1]))


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    x_grad = numpy_matmul(grad, weight.t().contiguous())
    weight_grad = numpy_matmul(x.reshape(-1, x.shape[-1]).t().contiguous(), grad.reshape(-1, grad.shape[-1]))
    return x_grad, weight_grad


numpy_matmul.register_autograd(_backward, setup_context=_setup)


class NumpyMatmul(nn.Module):
    """x @ W through the op above: invisible to every FLOP counter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return numpy_matmul(x, self.weight)


class PlainMatmul(NumpyMatmul):
    """The twin: the same product as an aten matmul, which FlopCounterMode counts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Undeclared(NumpyMatmul):
    """Never declared (declarations apply to their exact class)."""


class TinyLM(nn.Module):
    """Embedding, four blocks of one matmul each (the last three are folded into one trace), a head."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([block() for _ in range(4)])
        self.lm_head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> CausalLMOutput:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = torch.relu(block(hidden))
        logits = self.lm_head(hidden)
        return CausalLMOutput(loss=F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits=logits)


def matmul_flops(module: nn.Module, args: tuple, kwargs: dict) -> float:
    """2 * tokens * in * out, from the input's shape."""
    rows, columns = module.weight.shape
    return 2.0 * args[0].shape[:-1].numel() * rows * columns


def frozen_below_head(model: TinyLM) -> TinyLM:
    for module in (model.embed, model.blocks):
        module.requires_grad_(False)
    return model


@pytest.mark.parametrize("trains", ["everything", "head_only"])
def test_a_declared_class_counts_as_its_plain_twin(trains: str) -> None:
    """Training everything, each block's backward is 2x its forward; with only the head trained the
    blocks run no backward at all, declared or not."""
    declare_flops(NumpyMatmul, matmul_flops)
    prepare = frozen_below_head if trains == "head_only" else (lambda model: model)
    engine = FlopEngine.from_model(prepare(TinyLM(NumpyMatmul)), full_batch(2, 9))
    twin = prepare(TinyLM(PlainMatmul))
    for length in LENGTHS:
        batch = full_batch(3, length)
        assert_flops(engine.estimate(batch).model_flops, step_truth(twin, batch), f"length {length}")
    assert "FLOPs declared: blocks.0" in engine.description


def test_an_undeclared_kernel_is_invisible() -> None:
    """Why declarations exist: without one, the blocks' matmuls are missing from the count."""
    engine = FlopEngine.from_model(TinyLM(Undeclared), full_batch(2, 9))
    batch = full_batch(3, LENGTHS[0])
    assert engine.estimate(batch).model_flops < step_truth(TinyLM(PlainMatmul), batch)


def module_truth(model: nn.Module, batch: dict[str, torch.Tensor], name: str) -> int:
    """Forward + backward FLOPs that FlopCounterMode attributes to the submodule ``name``."""
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(counter.get_flop_counts()[f"{type(model).__name__}.{name}"].values())


def test_an_instance_declaration_applies_to_that_module_alone() -> None:
    """One of four identical blocks is declared (under its own component): it is neither folded with
    the others nor does its declaration reach them."""
    model = TinyLM(PlainMatmul)
    declare_flops(model.blocks[2], matmul_flops, component="kernel")
    assert declared(model.blocks[2]) is not None and declared(model.blocks[1]) is None
    engine = FlopEngine.from_model(model, full_batch(2, 9))
    for length in LENGTHS:
        batch = full_batch(3, length)
        step = engine.estimate(batch)
        assert_flops(step.breakdown["kernel"], module_truth(model, batch, "blocks.2"), "declared block")
        assert_flops(step.model_flops, step_truth(model, batch), f"length {length}")


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(TypeError, match="nn.Module subclass or instance"):
        declare_flops("NumpyMatmul", matmul_flops)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backward"):
        declare_flops(NumpyMatmul, matmul_flops, backward=-1.0)

    class Negative(NumpyMatmul):
        pass

    declare_flops(Negative, lambda module, args, kwargs: -1.0)
    with pytest.raises(ModelIntrospectionError, match="Negative must be a finite number"):
        FlopEngine.from_model(TinyLM(Negative), full_batch(2, 9))


@pytest.mark.parametrize("trains", ["everything", "head_only"])
def test_a_declaration_counts_on_the_real_step_too(trains: str) -> None:
    """The real-step counter runs the kernel for real: it records the declaration instead of what runs
    inside, with the backward only where the module's output reaches the loss."""
    from tests.flops.test_observe import observed_engine

    declare_flops(NumpyMatmul, matmul_flops)
    prepare = frozen_below_head if trains == "head_only" else (lambda model: model)
    engine = observed_engine(prepare(TinyLM(NumpyMatmul)), full_batch(2, 9))
    twin = prepare(TinyLM(PlainMatmul))
    for length in LENGTHS:
        batch = full_batch(3, length)
        step = engine.estimate(batch)
        assert_flops(step.model_flops, step_truth(twin, batch), f"model FLOPs, length {length}")
        assert_flops(step.hardware_flops, step_truth(twin, batch), f"hardware FLOPs, length {length}")
