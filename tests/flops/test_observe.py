"""Counting a real step (``flops/observe.py``) against FlopCounterMode on the same step: models the
meta-device copy cannot trace or would miscount, at more than one shape."""

from __future__ import annotations

import functools
from typing import Any

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks.flops import FlopEngine, observe_step, token_counting
from mfu_callbacks.testing import causal_lm, make_eager, moe_lm, reference_step_flops
from tests.conftest import (
    VOCAB,
    assert_flops,
    full_batch,
    keyword_forward,
    model_truth,
    packed_batch,
    padded_batch,
    step_truth,
)


def _loss(output: Any) -> torch.Tensor:
    return output.loss if hasattr(output, "loss") else output


def observed_engine(model: nn.Module, batch: Any, forward=keyword_forward) -> FlopEngine:
    """The engine fitted to one real step of ``model`` on ``batch``, as a training loop runs it."""
    counting = token_counting(model)
    observer = observe_step(model, batch, counting)
    with observer:
        _loss(forward(model, batch)).backward()
    model.zero_grad(set_to_none=True)
    features = counting.count(batch).tolist()
    return FlopEngine.from_observation(model, observer.observation, counting, features)


def llama(lora: bool = False, attention: str = "eager", **options: Any) -> nn.Module:
    return make_eager(
        causal_lm(vocab=VOCAB, kv_heads=2, lora_rank=4 if lora else None, attention=attention, **options)
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_real_step_is_counted_exactly_and_the_fit_holds_at_other_shapes(lora: bool) -> None:
    model = llama(lora)
    engine = observed_engine(model, padded_batch([5, 12]))
    for batch in (padded_batch([5, 12]), full_batch(3, 24), padded_batch([7, 3, 16])):
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(model, batch), "model FLOPs")
        assert_flops(step.hardware_flops, step_truth(model, batch), "hardware FLOPs")


def test_sdpa_with_grouped_query_attention_is_counted_from_its_kernel() -> None:
    model = causal_lm(vocab=VOCAB, kv_heads=2, attention="sdpa")
    engine = observed_engine(model, full_batch(2, 16))
    eager = make_eager(model)
    for batch in (full_batch(2, 16), full_batch(1, 40)):
        assert_flops(engine.estimate(batch).model_flops, model_truth(eager, batch), "model FLOPs")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_under_lora_is_recompute_not_model_flops(reentrant: bool) -> None:
    model = llama(lora=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    engine = observed_engine(model, full_batch(2, 16))
    plain = llama(lora=True)  # the same model without checkpointing, nor the gradient it forces on the inputs
    for batch in (full_batch(2, 16), full_batch(3, 24)):
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(plain, batch), "model FLOPs (checkpointing off)")
        assert_flops(step.hardware_flops, step_truth(model, batch), "hardware FLOPs (recompute)")


def test_packed_rows_count_attention_per_document() -> None:
    model = llama()
    engine = observed_engine(model, full_batch(1, 20))
    for documents in ([5, 9, 6], [12, 4]):
        batch = packed_batch(documents)
        assert_flops(engine.estimate(batch).model_flops, model_truth(model, batch), "model FLOPs")


# -- a fused head whose backward recomputes the logits ------------------------------------------------
class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss of ``hidden @ weight.T`` without keeping the logits: the backward computes them again."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        total = hidden.new_zeros(())
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start : start + chunk] @ weight.t()
            total = total + F.cross_entropy(logits.float(), labels[start : start + chunk], reduction="sum")
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
        for start in range(0, hidden.shape[0], ctx.chunk):
            piece = hidden[start : start + ctx.chunk]
            logits = (piece @ weight.t()).float()
            delta = torch.softmax(logits, dim=-1)
            delta[torch.arange(piece.shape[0]), labels[start : start + ctx.chunk]] -= 1
            delta = (delta * grad / hidden.shape[0]).to(hidden.dtype)
            grad_hidden[start : start + ctx.chunk] = delta @ weight
            if ctx.needs_input_grad[1]:
                grad_weight += delta.t() @ piece
        return grad_hidden, grad_weight, None, None


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_head_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token loss through the fused head (targets rolled so that every position has one)."""
    lm = _causal_lm(model)
    hidden = lm.model(input_ids=batch["input_ids"]).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = batch["labels"].roll(-1, dims=1).reshape(-1)
    return ChunkedLinearCrossEntropy.apply(hidden, lm.lm_head.weight, labels, 8)


def unfused_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    lm = _causal_lm(model)
    logits = lm.lm_head(lm.model(input_ids=batch["input_ids"]).last_hidden_state)
    labels = batch["labels"].roll(-1, dims=1).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_fused_head_counts_like_its_unfused_twin_and_its_recompute_as_hardware(lora: bool) -> None:
    model = llama(lora)
    engine = observed_engine(model, full_batch(2, 17), fused_head_forward)
    for batch in (full_batch(2, 17), full_batch(3, 25)):
        step = engine.estimate(batch)
        twin = reference_step_flops(model, batch, unfused_forward)
        fused = reference_step_flops(model, batch, fused_head_forward)
        head_once = 2 * batch["input_ids"].numel() * 32 * VOCAB
        assert fused == twin + head_once, "the fused head recomputes its logits once"
        assert_flops(step.model_flops, twin, "model FLOPs: the unfused twin's")
        assert_flops(step.hardware_flops, fused, "hardware FLOPs: the recompute too")
        assert step.breakdown["head"] > 0


@pytest.mark.parametrize("first", ["policy", "reference"])
def test_a_separate_reference_run_without_grad_counts_its_forward_once(first: str) -> None:
    """DPO's way: a reference model outside the watched one, its weights asking for gradients, run
    under no_grad (its fused head too: a custom Function whose node never runs) in a step where the
    policy's fused head runs its custom backward. Its matmuls count their forward once, never a backward."""
    model, reference = llama(), llama()

    def forward(policy: nn.Module, batch: dict) -> torch.Tensor:
        def scored() -> torch.Tensor:
            with torch.no_grad():
                return fused_head_forward(reference, batch) + unfused_forward(reference, batch)

        before = scored() if first == "reference" else None
        loss = fused_head_forward(policy, batch)
        after = scored() if first == "policy" else before
        return loss + 0 * after

    engine = observed_engine(model, full_batch(2, 17), forward)
    for batch in (full_batch(2, 17), full_batch(3, 25)):
        step = engine.estimate(batch)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unfused_forward(reference, batch)
        reference_forward = counter.get_total_flops()
        twin = reference_step_flops(model, batch, unfused_forward)
        assert_flops(step.model_flops, twin + 2 * reference_forward, "the reference's two forwards once each")
        fused = reference_step_flops(model, batch, fused_head_forward)
        assert_flops(step.hardware_flops, fused + 2 * reference_forward, "hardware FLOPs")


# -- hand-written top-k routing that a meta-device copy cannot run ----------------------------------
def tiny_moe_lm(dispatch: str = "where") -> nn.Module:
    """Two layers of four experts, top-2, routed by hand (``mfu_callbacks.testing.TopKMoE``)."""
    return moe_lm(vocab=VOCAB, hidden=32, inner=48, layers=2, experts=4, top_k=2, dispatch=dispatch)


@pytest.mark.parametrize("dispatch", ["where", "nonzero", "split", "capacity"])
def test_hand_written_top_k_routing_counts_the_routed_experts(dispatch: str) -> None:
    model = tiny_moe_lm(dispatch=dispatch)
    engine = observed_engine(model, full_batch(2, 16))
    for batch in (full_batch(2, 16), full_batch(3, 24), full_batch(1, 40)):
        truth = reference_step_flops(model, batch)  # rows without padding: model = hardware FLOPs
        step = engine.estimate(batch)
        assert_flops(step.model_flops, truth, "model FLOPs")
        assert_flops(step.hardware_flops, truth, "hardware FLOPs")
        assert step.breakdown["router"] > 0 and step.breakdown["experts"] > 0


# -- an output that never reaches the loss ------------------------------------------------------------
class WithProbe(nn.Module):
    """Returns the loss and an auxiliary projection nothing trains through."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.probe = nn.Linear(16, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return self.head(hidden).square().mean(), self.probe(hidden)


def test_an_output_that_never_reaches_the_loss_gets_no_backward() -> None:
    model = WithProbe()

    def forward(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return module(batch)[0]

    batch = torch.randn(8, 16)
    engine = observed_engine(model, batch, forward)
    for rows in (8, 20):
        batch = torch.randn(rows, 16)
        truth = reference_step_flops(model, batch, forward)
        assert_flops(engine.estimate(batch).model_flops, truth, "model FLOPs")


# -- a fused head whose result a kernel the dispatcher never sees writes (as Triton kernels do) -----
class OpaqueResultHead(torch.autograd.Function):
    """Like ChunkedLinearCrossEntropy, but its loss leaves through NumPy: no aten op links it to the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        ctx.save_for_backward(hidden, weight, labels)
        logits = hidden @ weight.t()
        value = F.cross_entropy(logits.float(), labels).item()
        return torch.from_numpy(numpy.array(value, dtype=numpy.float32)).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels = ctx.saved_tensors
        delta = torch.softmax((hidden @ weight.t()).float(), dim=-1)
        delta[torch.arange(hidden.shape[0]), labels] -= 1
        delta = (delta * grad / hidden.shape[0]).to(hidden.dtype)
        grad_weight = delta.t() @ hidden if ctx.needs_input_grad[1] else None
        return delta @ weight, grad_weight, None


def labelled_head_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """Scores the positions whose next token is labelled only (``hidden[mask]``), through the opaque
    head, shifted as TRL's fused head and Hugging Face's loss shift them."""
    lm = _causal_lm(model)
    hidden = lm.model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return OpaqueResultHead.apply(hidden[:, :-1][mask], lm.lm_head.weight, targets[mask])


def prompt_completion_batch(prompts: list[int], completions: list[int]) -> dict[str, torch.Tensor]:
    """Rows of a prompt and a completion, right-padded; only the completion is labelled."""
    batch = padded_batch([p + c for p, c in zip(prompts, completions)])
    for row, prompt in enumerate(prompts):
        batch["labels"][row, :prompt] = -100
    return batch


def test_a_head_that_scores_labelled_positions_follows_each_batchs_labels() -> None:
    model = llama()
    engine = observed_engine(model, prompt_completion_batch([4, 9], [8, 3]), labelled_head_forward)
    for batch in (
        prompt_completion_batch([4, 9], [8, 3]),
        prompt_completion_batch([12, 2, 5], [2, 14, 11]),  # the labelled share moves from 0.42 to 0.61
        prompt_completion_batch([20, 18], [1, 2]),  # and to 0.07
        full_batch(2, 9),
    ):
        step = engine.estimate(batch)
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        recompute = 2 * labelled * 32 * VOCAB  # the head's backward computes its logits again: not model work
        truth = model_truth(model, batch, labelled_head_forward) - recompute
        assert_flops(step.model_flops, truth, "model FLOPs")
        assert_flops(step.hardware_flops, step_truth(model, batch, labelled_head_forward), "hardware FLOPs")
        assert step.breakdown["head"] > 0


# -- kernels the dispatcher never sees (Triton: Liger's RMSNorm and SwiGLU), imitated on a CPU --------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _UnseenKernel(torch.autograd.Function):
    """``function`` run as a Triton kernel runs: forward and backward out of the dispatcher's sight."""

    @staticmethod
    def forward(ctx, function, *inputs):
        with torch._C._DisableTorchDispatch():
            output = function(*inputs)
        ctx.function = function
        ctx.save_for_backward(*inputs)
        return output

    @staticmethod
    def backward(ctx, grad):
        with torch._C._DisableTorchDispatch(), torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            grads = torch.autograd.grad(ctx.function(*inputs), inputs, grad)
        return (None, *grads)


def _with_unseen_kernels(model: nn.Module) -> nn.Module:
    """Each RMSNorm and each MLP's SwiGLU replaced by a kernel the dispatcher never sees (as Liger's are)."""

    def norm(module: nn.Module):
        def forward(hidden):
            return _UnseenKernel.apply(
                functools.partial(_rms_norm, eps=module.variance_epsilon), hidden, module.weight
            )

        return forward

    def mlp(module: nn.Module):
        def forward(x):
            return module.down_proj(_UnseenKernel.apply(_swiglu, module.gate_proj(x), module.up_proj(x)))

        return forward

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = norm(module)
        elif type(module).__name__.endswith("MLP"):
            module.forward = mlp(module)
    return model


@pytest.mark.slow  # three steps against FlopCounterMode: seconds on a CPU
def test_the_outputs_of_kernels_the_dispatcher_never_sees_derive_from_their_inputs() -> None:
    """Outputs written by an unseen kernel derive from the batch and carry gradients as the Function's
    inputs do: the matmuls after them are fitted right, at the observed shape and at others."""
    model, twin = _with_unseen_kernels(llama()), llama()
    engine = observed_engine(model, padded_batch([5, 12]))
    for batch in (padded_batch([5, 12]), full_batch(3, 24), padded_batch([7, 3, 16])):
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(twin, batch), "model FLOPs")
        assert_flops(step.hardware_flops, step_truth(twin, batch), "hardware FLOPs")
