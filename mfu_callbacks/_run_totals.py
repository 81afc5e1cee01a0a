"""What the meter has read over a run, summed, and the utilization formula: shared by the meter's
metrics and summary and by the diagnoses, so MFU is computed in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


def per_gpu_per_second(amount: float, wall_seconds: float, world_size: int) -> float:
    """``amount`` (FLOPs or tokens, summed over ranks) per GPU per second of wall time."""
    return amount / (wall_seconds * world_size)


def utilization(flops: float, wall_seconds: float, world_size: int, peak_flops: float) -> float:
    """MFU (model FLOPs) or HFU (hardware FLOPs), after PaLM (Chowdhery et al., 2022), appendix B.

    The FLOP/s a step achieved per GPU over the dense peak FLOP/s of one GPU: ``flops`` are summed
    over all ranks, ``wall_seconds`` is the slowest rank's time (the others wait for it), and
    ``world_size`` GPUs shared the work.
    """
    return per_gpu_per_second(flops, wall_seconds, world_size) / peak_flops


class Window(Protocol):
    """One read of the meter, all ranks combined (the meter's ``_Window``)."""

    world_size: int
    model_flops: float
    hardware_flops: float
    tokens: float
    padded_tokens: float
    step_seconds: float
    input_wait_seconds: float
    counting_ranks: float
    wall_seconds: float
    steps: float
    step_time_max: float
    step_time_min: float


_SUMMED = ("model_flops", "hardware_flops", "tokens", "padded_tokens", "step_seconds", "input_wait_seconds",
           "wall_seconds", "steps")


@dataclass
class RunTotals:
    """The windows read so far, summed; per-rank extremes weighted by the steps of each window."""

    model_flops: float = 0.0
    hardware_flops: float = 0.0
    tokens: float = 0.0
    padded_tokens: float = 0.0
    step_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    wall_seconds: float = 0.0
    steps: float = 0.0
    slowest_rank_seconds: float = 0.0  # sum over windows of (slowest rank's mean step time x steps)
    fastest_rank_seconds: float = 0.0
    world_size: int = 1
    counted: bool = False  # whether any rank's FLOP engine counted a batch

    def add(self, window: Window) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(window, name))
        if math.isfinite(window.step_time_max) and math.isfinite(window.step_time_min):
            self.slowest_rank_seconds += window.step_time_max * window.steps
            self.fastest_rank_seconds += window.step_time_min * window.steps
        self.world_size = window.world_size
        self.counted = self.counted or window.counting_ranks > 0

    def utilization(self, flops: float, peak_flops: float | None) -> float | None:
        """MFU or HFU of the run, None without a peak."""
        if not peak_flops or self.wall_seconds <= 0:
            return None
        return utilization(flops, self.wall_seconds, self.world_size, peak_flops)
