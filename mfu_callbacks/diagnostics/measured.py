"""Matmul times measured in the run itself, per component: the shape checks prefer them to the table.

Profiled steps fill ``Review.measured_matmuls``; the checks read how much slower one component's
matmuls ran than the best of the step's, per FLOP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MatmulTime:
    """The matmuls of one component (``flops/components.py`` names) in one step, forward + backward.

    seconds: their GPU time per step; flops: their FLOPs per step.
    """

    seconds: float
    flops: float

    @property
    def rate(self) -> float:
        """FLOP/s (0 for a component without time)."""
        return self.flops / self.seconds if self.seconds > 0 else 0.0


def measured_slowdown(measured: Mapping[str, MatmulTime], component: str) -> float | None:
    """How much slower ``component``'s matmuls ran per FLOP than the step's fastest component's.

    slowdown = (its seconds x best rate) / its FLOPs, best rate = max over components of FLOPs /
    seconds. None where the component was not measured.
    """
    own = measured.get(component)
    if own is None or own.flops <= 0 or own.seconds <= 0:
        return None
    best = max(time.rate for time in measured.values())
    return own.seconds * best / own.flops
