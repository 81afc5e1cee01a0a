"""The meter's profile window (``profile_steps``): where it starts, the context its advice is judged in,
and its breakdown scaled to the measured step (``attribution.calibrated``)."""

from __future__ import annotations

import torch
from torch import nn

from ._options import MFUOptions
from ._peak_choice import PeakChoice
from ._profile_window import ProfileWindow
from ._recorder import StepRecorder
from .attribution import Breakdown, calibrated
from .diagnostics.checks import MATMUL_ALIGNMENT
from .diagnostics.measured import MatmulTime
from .timer import StepTimer


def profile_window(model: nn.Module, device: torch.device, options: MFUOptions) -> ProfileWindow | None:
    """The window of ``profile_steps`` steps, from ``profile_start`` (default: the first after warm-up)."""
    if not options.profile_steps:
        return None
    start = options.profile_start if options.profile_start is not None else options.warmup_steps + 1
    return ProfileWindow(model, device, options.profile_steps, start)


def profile_step_begins(
    window: ProfileWindow, recorder: StepRecorder, timer: StepTimer, peaks: PeakChoice
) -> bool:
    """Open, go on with or close the profile window at a step boundary (once the FLOP engine is ready to
    profile); whether the step begun is profiled."""
    if window.finished or (not window.is_open and not recorder.ready_to_profile):
        return False
    with timer.paused():  # the syncs and the analysis are neither step time nor input wait
        return window.step_begins(timer.steps_started, lambda: profile_context(peaks))


def profile_context(peaks: PeakChoice) -> tuple[float | None, int]:
    """The peak and the matmul size multiple the profile's advice is judged with, when it closes."""
    dtype = peaks.compute_dtype()
    return (peaks.peak.flops if peaks.peak is not None else None), MATMUL_ALIGNMENT.get(dtype or "", 1)


def step_breakdown(window: ProfileWindow, peaks: PeakChoice, measured_seconds: float) -> Breakdown | None:
    """Where the profiled steps' time went, once the window closed (a run that ends inside the window
    closes it here); scaled to the mean measured step (``measured_seconds``) once there is one."""
    if window.is_open:
        window.close(*profile_context(peaks))
    if window.result is None:
        return None
    return calibrated(window.result, measured_seconds) if measured_seconds > 0 else window.result


def matmul_times(
    window: ProfileWindow | None, peaks: PeakChoice, measured_seconds: float
) -> dict[str, MatmulTime] | None:
    """Matmul time and FLOPs per step by component, from the profile window (once it closed)."""
    if window is None or window.result is None:
        return None
    result = step_breakdown(window, peaks, measured_seconds)
    assert result is not None
    return {
        name: MatmulTime(seconds=bucket.seconds, flops=bucket.flops)
        for name, bucket in result.matmul_buckets().items()
        if bucket.flops
    }
