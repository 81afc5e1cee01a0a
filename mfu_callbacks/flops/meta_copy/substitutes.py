"""Analytic stand-ins for modules a meta-device forward cannot run or a trace would miscount.

MoE experts route tokens with data-dependent indexing (and may run a grouped-mm kernel that the
flop counters do not see); quantized linears (bitsandbytes 4/8-bit) call kernels with no meta
implementation. On the replica their ``forward`` is replaced by one that records the matmuls
they do, from their shapes, and returns an output of the right shape.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

_QUANTIZED_LINEARS = frozenset({"Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4", "Linear8bit"})
_SECOND_STAGE = ("down", "w2", "wo")  # expert weights applied to the first stage's output


class Recorder(Protocol):
    """What the substitutes record into: a ``MatmulRecorder``, or one that passes on to the current one."""

    def record_module_matmul(
        self, forward: float, operands_requiring_grad: int, output: torch.Tensor | None, forced: int = 0
    ) -> None: ...

    def backward_products(self, *operands: Sequence[torch.Tensor]) -> tuple[int, int]: ...

    def note_saved(self) -> None: ...


class _QuantizedLinear(Protocol):
    """What the substitute of a quantized linear reads from it."""

    in_features: int
    out_features: int


class _Opaque(torch.autograd.Function):
    """The output of a replaced forward: the real output's shape, and a gradient path from every
    input the real output depends on, so that what follows requires a gradient exactly when it
    would. Nothing is computed and nothing is saved for the backward."""

    @staticmethod
    def forward(ctx, shape: torch.Size, like: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return like.new_empty(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *(None for _ in ctx.needs_input_grad[2:]))


def _expert_weight_names(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3]


def is_experts(module: nn.Module) -> bool:
    """An experts container in the fused style of transformers 5: 3-D weights [experts, out, in]."""
    return len(_expert_weight_names(module)) >= 2 and "expert" in type(module).__name__.lower()


def is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ in _QUANTIZED_LINEARS and hasattr(module, "in_features")


def _experts_forward(recorder: Recorder, names: list[str]) -> Callable:
    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights=None,
        *args,
        **kwargs,
    ):
        routed_tokens = top_k_index.numel()  # every token goes to exactly top_k experts
        # Read by attribute: a weight that PEFT's target_parameters wraps in a parametrization
        # (base weight + LoRA delta) is computed here, as in the real forward.
        weights = {name: getattr(self, name) for name in names}
        first = {name: w for name, w in weights.items() if not any(key in name for key in _SECOND_STAGE)}
        second = {name: w for name, w in weights.items() if name not in first}
        inputs = [t for t in (hidden_states, top_k_weights, *weights.values()) if isinstance(t, torch.Tensor)]
        output = _Opaque.apply(hidden_states.shape, hidden_states, *inputs)
        for weight in first.values():
            flops = 2.0 * routed_tokens * weight.shape[1] * weight.shape[2]
            needed, forced = recorder.backward_products([hidden_states], [weight])
            recorder.record_module_matmul(flops, needed, output, forced)
        intermediate = [hidden_states, *first.values()]  # what the second stage's input derives from
        for weight in second.values():
            flops = 2.0 * routed_tokens * weight.shape[1] * weight.shape[2]
            needed, forced = recorder.backward_products(intermediate, [weight])
            recorder.record_module_matmul(flops, needed, output, forced)
        if (
            output.requires_grad
        ):  # the real experts save tensors after their last matmul (routing-weight product)
            recorder.note_saved()
        return output

    return forward


def _quantized_linear_forward(recorder: Recorder) -> Callable:
    def forward(self: _QuantizedLinear, x: torch.Tensor, *args, **kwargs):
        tokens = x.numel() // self.in_features
        flops = 2.0 * tokens * self.in_features * self.out_features
        bias = getattr(self, "bias", None)
        inputs = [t for t in (x, bias) if isinstance(t, torch.Tensor)]
        output = _Opaque.apply(torch.Size((*x.shape[:-1], self.out_features)), x, *inputs)
        # A quantized base weight never trains: only the input gradient can run. bitsandbytes keeps
        # what its backward needs on ctx, not through autograd's saved tensors, so a checkpoint's
        # early stop never waits for it: no save is noted.
        needed, forced = recorder.backward_products([x])
        recorder.record_module_matmul(flops, needed, output, forced)
        return output

    return forward


def install_substitutes(replica: nn.Module, recorder: Recorder) -> list[str]:
    """Replace forwards on the replica (never on the user's model); return what was replaced."""
    replaced: list[str] = []
    for name, module in replica.named_modules():
        if is_experts(module):
            module.forward = types.MethodType(
                _experts_forward(recorder, _expert_weight_names(module)), module
            )
            replaced.append(f"{name} (MoE experts: routed tokens x expert matmuls)")
        elif is_quantized_linear(module):
            module.forward = types.MethodType(_quantized_linear_forward(recorder), module)
            replaced.append(f"{name} (quantized linear: same matmul as its full-precision shape)")
    return replaced
