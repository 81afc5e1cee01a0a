"""The FLOP engine: exact training FLOPs of a model from introspection. Knows no training framework."""

from __future__ import annotations

from typing import Any

from torch import nn

from .declared import declare_flops
from .engine import FlopEngine, Forward, ModelIntrospectionError
from .step_flops import StepFlops
from .tokens import BatchError, TokenCounter


def estimate_step_flops(
    model: nn.Module, batch: Any, *, forward: Forward | None = None, token_counter: TokenCounter | None = None
) -> StepFlops:
    """FLOPs of one training step of ``model`` on ``batch`` (forward + backward, per the model's trainable state).

    ``forward(model, batch)`` tells how a batch reaches a model that does not take it as keyword arguments.
    Building the engine costs a few meta-device forward passes; callbacks build it once and reuse it.
    """
    return FlopEngine.from_model(model, batch, forward=forward, token_counter=token_counter).estimate(batch)


__all__ = [
    "BatchError",
    "FlopEngine",
    "Forward",
    "ModelIntrospectionError",
    "StepFlops",
    "TokenCounter",
    "declare_flops",
    "estimate_step_flops",
]
