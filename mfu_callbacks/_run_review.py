"""When and with what the meter's diagnoses review a run (``Diagnostics.review``): host-side numbers
only, no sync, no collective."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ._meter_profile import matmul_times
from ._peak_choice import PeakChoice
from ._profiled_steps import ProfiledSteps
from ._window import RunTotals
from .diagnostics import Diagnostics
from .flops import FlopEngine

logger = logging.getLogger("mfu_callbacks")
_REVIEW_GROWTH = 1.1  # the diagnoses are reviewed again once the measured steps grew by this factor
# ... and the measured time by this much: a review walks the model's layers (milliseconds on a LoRA
# model's hundreds of adapters), so that early in a run, when the steps grow by a tenth at every read,
# it costs at most a few parts in ten thousand of the run's time.
_REVIEW_SECONDS = 10.0


class RunReview:
    """The diagnoses of one meter's run, reviewed at its reads when due.

    They judge the run's totals, which a read moves little late in a run: they are reviewed at the
    first read, then when the measured steps grew by a tenth and the measured time by ten seconds since
    the last review (O(log steps) reviews over a run, so a read costs the same at step 10 and at step
    100,000, and a log at every step of a short step does not review at every step early on), when a
    profiling has just ended, and at the end of the run (``force``).
    """

    def __init__(
        self, diagnostics: Diagnostics, model: nn.Module, peaks: PeakChoice, profile: ProfiledSteps | None
    ) -> None:
        self._diagnostics = diagnostics
        self._model = model
        self._peaks = peaks
        self._profile = profile
        # (measured steps, profile pending, measured seconds) at the last review
        self.last: tuple[float, bool, float] | None = None

    def __call__(
        self,
        run: RunTotals,
        engine: FlopEngine | None,
        run_features: torch.Tensor | None,
        *,
        force: bool = False,
    ) -> None:
        profile = self._profile
        profile_pending = profile is not None and not profile.finished
        due = (
            force
            or self.last is None
            or (
                run.steps >= self.last[0] * _REVIEW_GROWTH
                and run.wall_seconds >= self.last[2] + _REVIEW_SECONDS
            )
            or profile_pending != self.last[1]
        )
        if not due:
            return
        self.last = (run.steps, profile_pending, run.wall_seconds)
        peaks = self._peaks
        try:
            self._diagnostics.review(
                run,
                model=self._model,
                engine=engine,
                run_features=run_features,
                peak_flops=peaks.peak_flops(engine),
                compute_dtype=peaks.compute_dtype(),
                autocast_in_training=peaks.autocast.enabled_at_first_forward,
                device_name=peaks.peak.device_name if peaks.peak is not None else None,
                measured_matmuls=matmul_times(profile, peaks, run.mean_iteration_seconds),
                profile_pending=profile_pending,
            )
        except Exception:  # noqa: BLE001 - diagnoses are advice: they never cost the run its metrics
            logger.debug("mfu_callbacks: diagnoses failed", exc_info=True)
