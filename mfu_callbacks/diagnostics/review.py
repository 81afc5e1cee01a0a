"""What the checks read and what they return: one :class:`Review` of the run at a read of the meter, one
:class:`Diagnosis` per cause found, and the MFU a cause costs.

Costs are estimates: a step's time is taken to scale with the FLOPs it computes, so removing a share
``s`` of the computed FLOPs (padding, recompute) or of the iteration time (input wait) would raise
MFU by ``mfu * s / (1 - s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .._window import PeakFlops, RunTotals
from ..flops.features import MODEL
from .clocks import ClockLog
from .measured import MatmulTime
from .model_shapes import ModelShapes


@dataclass(frozen=True)
class Diagnosis:
    """One cause of lost MFU, found in this run.

    id: stable, for silencing and for W&B summary keys. message: one line with the number that
    triggered it and the fix. value: that number; threshold: the limit it crossed. mfu_cost: how
    much higher MFU (a fraction, like ``mfu``) would be without the cause, an estimate; None where
    it cannot be estimated. flops_share: share of the step's model FLOPs concerned, where it applies.
    details: further numbers behind the message, by name.
    """

    id: str
    message: str
    value: float
    threshold: float
    mfu_cost: float | None = None
    flops_share: float | None = None
    details: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.id}] {self.message}"


@dataclass(frozen=True)
class FlopSplit:
    """The run's FLOPs (this rank's features) and the shares of its hardware FLOPs that are waste."""

    model_flops: float
    breakdown: Mapping[str, float]
    padding_share: float  # of hardware FLOPs: computed on padding tokens
    recompute_share: float  # of hardware FLOPs: rerun by activation checkpointing


@dataclass
class Review:
    """What the checks read at one read of the meter (host-side numbers only)."""

    run: RunTotals
    model: nn.Module
    split: FlopSplit | None
    peak_flops: PeakFlops | None  # one peak, or one per dtype the matmuls ran in
    compute_dtype: str | None
    autocast_in_training: bool | None  # None when no forward was seen
    clocks: ClockLog
    read_model_shapes: Callable[[], ModelShapes]
    device_name: str | None = None  # as torch names the GPU: picks the rows of the slowdown table
    # Matmul times per component measured in the run (profiled steps); None where none ran.
    measured_matmuls: Mapping[str, MatmulTime] | None = None
    # Profiled steps are still to run: the alignment checks wait for its measurement.
    profile_pending: bool = False

    @cached_property
    def mfu(self) -> float | None:
        return self.run.model_utilization(self.peak_flops)

    @property
    def shapes(self) -> ModelShapes:
        return self.read_model_shapes()

    @property
    def step_seconds(self) -> float:
        """Mean seconds of one step as MFU counts it (the slowest rank's, input wait included)."""
        return self.run.mean_iteration_seconds

    def share_of_model_flops(self, component: str) -> float:
        split = self.split
        return (
            split.breakdown.get(component, 0.0) / split.model_flops
            if split is not None and split.model_flops
            else 0.0
        )


Check = Callable[[Review], "Diagnosis | None"]


def recovered(mfu: float | None, wasted_share: float) -> float | None:
    """MFU gained if a share of the time went away: the same FLOPs in (1 - share) of the time."""
    if mfu is None or wasted_share >= 1.0:
        return None
    return mfu * wasted_share / (1.0 - wasted_share)


def cost_text(mfu: float | None, cost: float | None) -> str:
    """The cost in a diagnosis's message: the MFU measured and the MFU without the cause."""
    if mfu is None or cost is None:
        return ""
    return f": MFU {mfu:.1%} would be about {mfu + cost:.1%} without it"


def split_flops(engine: Any | None, features: torch.Tensor | None) -> FlopSplit | None:
    """Evaluate the engine's formula on the run's features, and again with the waste taken out.

    The hardware row of the features holds the computed tokens, the model row the real ones. The
    hardware formula on real tokens is the run without padding. The recompute is what the engine
    counted as rerun by activation checkpointing, not whatever hardware FLOPs exceed model FLOPs by
    (gradients forced onto inputs, a fused head's own recompute in its backward, a kernel's excess).
    """
    if engine is None or features is None:
        return None
    real = features[MODEL]
    run = engine.evaluate(features)
    if run.hardware_flops <= 0:
        return None
    without_padding = engine.evaluate(torch.stack([real, real])).hardware_flops
    # An engine that does not tell its recompute apart (one passed in ready-made) claims none.
    recompute = getattr(engine, "recompute_flops", None)
    recomputed = recompute(features) if recompute is not None else 0.0
    return FlopSplit(
        model_flops=float(run.model_flops),
        breakdown={name: float(value) for name, value in run.breakdown.items()},
        padding_share=max(0.0, 1.0 - without_padding / run.hardware_flops),
        recompute_share=max(0.0, recomputed / run.hardware_flops),
    )
