"""What the step timer reports of finished steps (``timer.py``), and what its CUDA events resolve to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepTiming:
    """Finished steps: their duration, the input wait before them and the meter's own time before
    them (its reads), in seconds (one step, or ``steps`` older steps folded together)."""

    step_seconds: float
    input_wait_seconds: float
    steps: int = 1
    meter_seconds: float = 0.0

    @property
    def iteration_seconds(self) -> float:
        """The step and everything before it since the last one: the time base of throughput and MFU."""
        return self.step_seconds + self.input_wait_seconds + self.meter_seconds
