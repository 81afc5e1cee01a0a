"""The meter's profiled steps (``profile_steps``): where they start, the context their advice is judged in,
and their breakdown scaled to the measured step (``attribution.calibrated``)."""

from __future__ import annotations

import torch
from torch import nn

from ._options import MFUOptions
from ._peak_choice import PeakChoice
from ._profiled_steps import ProfiledSteps
from ._recorder import StepRecorder
from .attribution import Breakdown, calibrated
from .diagnostics.checks import MATMUL_ALIGNMENT
from .diagnostics.measured import MatmulTime
from .timer import StepTimer


def profiled_steps(model: nn.Module, device: torch.device, options: MFUOptions) -> ProfiledSteps | None:
    """The ``profile_steps`` steps to profile, from ``profile_start`` (default: the first after warm-up)."""
    if not options.profile_steps:
        return None
    start = options.profile_start if options.profile_start is not None else options.warmup_steps + 1
    return ProfiledSteps(model, device, options.profile_steps, start)


def profile_step_begins(
    profiled: ProfiledSteps, recorder: StepRecorder, timer: StepTimer, peaks: PeakChoice
) -> bool:
    """Begin, go on with or end the profiling at a step boundary (once the FLOP engine is ready to
    profile); whether the step begun is profiled."""
    if profiled.finished or (not profiled.is_open and not recorder.ready_to_profile):
        return False
    with timer.paused():  # the syncs and the analysis are neither step time nor input wait
        return profiled.step_begins(timer.steps_started, lambda: profile_context(peaks))


def profile_context(peaks: PeakChoice) -> tuple[float | None, int]:
    """The peak and the matmul size multiple the profile's advice is judged with, when it closes."""
    dtype = peaks.compute_dtype()
    return (peaks.peak.flops if peaks.peak is not None else None), MATMUL_ALIGNMENT.get(dtype or "", 1)


def step_breakdown(profiled: ProfiledSteps, peaks: PeakChoice, measured_seconds: float) -> Breakdown | None:
    """Where the profiled steps' time went, once the profiling ended (a run that ends inside the
    profiled steps ends it here); scaled to the mean measured step (``measured_seconds``) once there is one."""
    if profiled.is_open:
        profiled.close(*profile_context(peaks))
    if profiled.result is None:
        return None
    return calibrated(profiled.result, measured_seconds) if measured_seconds > 0 else profiled.result


def matmul_times(
    profiled: ProfiledSteps | None, peaks: PeakChoice, measured_seconds: float
) -> dict[str, MatmulTime] | None:
    """Matmul time and FLOPs per step by component, from the profiled steps (once they ended)."""
    if profiled is None or profiled.result is None:
        return None
    result = step_breakdown(profiled, peaks, measured_seconds)
    assert result is not None
    return {
        name: MatmulTime(seconds=bucket.seconds, flops=bucket.flops)
        for name, bucket in result.matmul_buckets().items()
        if bucket.flops
    }
