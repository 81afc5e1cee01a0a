"""Which count a run uses: the meta-device copy's, a real step's, or the copy's checked against a real step.

``real_step`` (the user's option) chooses: "off" counts the copy alone, "only" a real step alone
(``observe.py``), "check" both, and ``settle`` keeps the copy's count where it agrees with the real
step's within 0.5%, else the real step's. Compiled and sharded models are counted from the copy
(``is_compiled``, ``is_sharded`` say why). The step hooks that drive these live in ``_recorder.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._torch_internals import COMPILED_IN_PLACE, COMPILED_WRAPPER, fsdp1_inner_module
from .counting.tokens import TokenCounter, TokenCounting
from .engine import FlopEngine, Forward, ModelIntrospectionError
from .model_config import token_counting
from .observe import RealStepObserver
from .sharding import tensor_parallel_degree

logger = logging.getLogger("mfu_callbacks")

AGREEMENT = 0.005  # the copy's count stands if within 0.5% of the real step's
OBSERVATION_ATTEMPTS = 3  # real steps observed, at most, before a run without a copy gives up


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs through torch.compile (a wrapper, or ``Module.compile()`` in place)."""
    return any(
        type(module).__name__ == COMPILED_WRAPPER or getattr(module, COMPILED_IN_PLACE, None) is not None
        for module in model.modules()
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded across ranks (FSDP1 with or without ``use_orig_params``,
    FSDP2, tensor parallel, DeepSpeed ZeRO-3). The copy then counts this rank's share (``sharding.py``),
    and the real step is not watched: under tensor parallel it would see DTensor ops at their global
    shapes, and under FSDP1 a frozen weight's view of the flat parameter asks for a gradient like a
    trainable one's, so its count could not stand as the check of the copy's."""
    return any(fsdp1_inner_module(module) is not None for module in model.modules()) or any(
        type(parameter).__name__ in ("DTensor", "FlatParameter") or hasattr(parameter, "ds_id")
        for parameter in model.parameters()
    )


def observe_step(model: nn.Module, batch: Any, counting: TokenCounting) -> RealStepObserver:
    """A dispatch mode that counts the real step about to run on ``batch`` (enter it before the
    forward, leave it after the backward); ``FlopEngine.from_observation`` turns it into an engine."""
    if tensor_parallel_degree(model) > 1:
        raise ModelIntrospectionError(
            "counting a real step under tensor parallel is not supported: its matmuls run as DTensor ops "
            "of global shapes, not this rank's share; count from the model's copy instead "
            "(real_step='check' or 'off')"
        )
    main, decoder, rows, _ = counting.streams(batch)
    if decoder is not None:
        raise ModelIntrospectionError(
            "counting a real step of an encoder-decoder is not supported: its matmuls cannot be told "
            "apart by stream from shapes alone"
        )
    return RealStepObserver(model, batch, counting.windows)


def counting_decision(model: nn.Module, real_step: str) -> str:
    """What a run counts with, from the user's ``real_step``: "check" is "off" for a compiled or sharded
    model (counted from the copy, README says how)."""
    if real_step == "check" and (is_compiled(model) or is_sharded(model)):
        return "off"
    return real_step


def copy_engine(
    model: nn.Module,
    batch: Any,
    decision: str,
    *,
    forward: Forward | None,
    token_counter: TokenCounter | None,
) -> FlopEngine | None:
    """The meta-device copy's engine, built from ``batch``; None under "only", and where the copy cannot
    be traced but a real step counts instead (said in the log). Under "off" that failure is raised."""
    if decision == "only":
        return None
    try:
        return FlopEngine.from_model(model, batch, forward=forward, token_counter=token_counter)
    except ModelIntrospectionError as error:
        if decision == "off":
            raise
        logger.info("mfu_callbacks: %s; counting a real step instead", error)
        return None


@dataclass
class Observing:
    """A real step about to be observed: its dispatch mode (not entered yet), how its batches are
    counted, and its micro-batch's features (None until that micro-batch comes)."""

    observer: RealStepObserver
    counting: TokenCounting
    features: torch.Tensor | None


def start_observation(
    model: nn.Module,
    batch: Any,
    counting: TokenCounting | None,
    token_counter: TokenCounter | None,
    *,
    awaiting: bool = False,
) -> Observing:
    """Prepare to watch this micro-batch's forward and backward; with ``awaiting``, ``batch`` is a pass
    without grad and the features are those of the next training micro-batch."""
    counting = counting or token_counting(model, token_counter)
    observer = observe_step(model, batch, counting)
    return Observing(observer, counting, None if awaiting else counting.count(batch))


def fit_observation(
    model: nn.Module,
    observer: RealStepObserver,
    counting: TokenCounting,
    features: torch.Tensor,
    copied: FlopEngine | None,
    *,
    attempts_left: int,
) -> FlopEngine | None:
    """The engine a run uses once the observed step is fitted: ``settle``'s choice. None where the
    observation cannot be counted and another attempt remains (said in the log); with none left and
    no copy, the error is raised with what the user can do."""
    rows = features.tolist()
    try:
        measured = FlopEngine.from_observation(model, observer.observation, counting, rows)
    except (ModelIntrospectionError, ValueError) as error:
        if copied is None and not attempts_left:
            raise ModelIntrospectionError(
                f"{error}. Pass forward= (a function that runs the model on a batch and returns the loss) "
                "or declare the FLOPs of the modules it cannot see (mfu_callbacks.declare_flops)"
            ) from error
        logger.info("mfu_callbacks: %s", error)
        return None
    return settle(copied, measured, rows)


def settle(
    copied: FlopEngine | None, measured: FlopEngine, features: Sequence[Sequence[float]]
) -> FlopEngine:
    """The count a run uses: the copy's where it agrees with the real step, else the real step's."""
    if copied is None:
        logger.info(measured.description)
        return measured
    ours, theirs = copied.evaluate(features), measured.evaluate(features)
    difference = ours.model_flops / max(theirs.model_flops, 1) - 1
    if abs(difference) <= AGREEMENT:
        logger.info("mfu_callbacks: the real step's FLOPs agree with the copy's (%+.3f%%)", 100 * difference)
        return copied
    components = sorted(set(ours.breakdown) | set(theirs.breakdown))
    differing = ", ".join(
        f"{name} {ours.breakdown.get(name, 0):.4g} vs {theirs.breakdown.get(name, 0):.4g}"
        for name in components
        if ours.breakdown.get(name, 0) != theirs.breakdown.get(name, 0)
    )
    logger.warning(
        "mfu_callbacks: the meta-device copy counted %+.2f%% FLOPs against the real step; the real step's "
        "count is used (model FLOPs of the observed step by component, copy vs real: %s)",
        100 * difference,
        differing,
    )
    return measured
