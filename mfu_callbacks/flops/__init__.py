"""The FLOP engine: exact training FLOPs of a model from introspection. Knows no training framework.

The only door into ``flops/``: the rest of the package imports what it needs from here."""

from __future__ import annotations

from typing import Any

from torch import nn

from .build import (
    OBSERVATION_ATTEMPTS,
    copy_engine,
    counting_decision,
    fit_observation,
    is_compiled,
    is_sharded,
    observe_step,
    settle,
    start_observation,
)
from .counting.plans import Group, Plan, constant_plan, whole_plan
from .counting.tokens import BatchError, TokenCounter, TokenCounting
from .declared import declare_flops
from .engine import FlopEngine, ModelIntrospectionError
from .meta_copy.probes import Forward
from .model_config import token_counting
from .observe import RealStepObserver
from .step_flops import StepFlops


def estimate_step_flops(
    model: nn.Module, batch: Any, *, forward: Forward | None = None, token_counter: TokenCounter | None = None
) -> StepFlops:
    """FLOPs of one training step of ``model`` on ``batch`` (forward + backward, per the model's trainable state).

    ``forward(model, batch)`` tells how a batch reaches a model that does not take it as keyword arguments.
    Building the engine costs a few meta-device forward passes; callbacks build it once and reuse it.
    """
    return FlopEngine.from_model(model, batch, forward=forward, token_counter=token_counter).estimate(batch)


__all__ = [
    "OBSERVATION_ATTEMPTS",
    "BatchError",
    "FlopEngine",
    "Group",
    "Plan",
    "Forward",
    "ModelIntrospectionError",
    "RealStepObserver",
    "StepFlops",
    "TokenCounter",
    "TokenCounting",
    "constant_plan",
    "copy_engine",
    "counting_decision",
    "declare_flops",
    "estimate_step_flops",
    "fit_observation",
    "is_compiled",
    "is_sharded",
    "observe_step",
    "settle",
    "start_observation",
    "token_counting",
    "whole_plan",
]
