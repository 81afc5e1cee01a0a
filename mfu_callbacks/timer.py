"""Step times without a host sync on the hot path.

On CUDA each optimizer step is bracketed by two timing events on the current stream; they are
resolved only when the timings are read (at log time), with one wait on the last event. A
``torch.cuda.synchronize()`` per step would cost a few percent of step time (FACTS.md: +3.2% on a
72 ms H100 step), which is larger than what an MFU meter is there to show. Without CUDA the host
clock is exact, since the work it brackets has finished when the step returns.

Input wait is the time between one step's end and the next step's start in which the device sat
idle: the data loader, the framework's bookkeeping, everything that is not the step itself. On
CUDA it is read from the GPU's timeline (the previous step's end event to this step's start event),
so host work that overlaps with queued GPU work costs nothing, as it costs nothing in training.
The meter's own log-time reads are left out of it (see ``StepTimer.paused``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import _validate

# Finished steps kept one by one before the oldest are folded into one entry: bounds memory in a
# run that reads its metrics rarely (or never), while the last steps stay separate.
_KEEP_STEPS = 256


@dataclass(frozen=True)
class StepTiming:
    """Finished steps: their duration and the input wait before them, in seconds (one step, or
    ``steps`` older steps folded together)."""

    step_seconds: float
    input_wait_seconds: float
    steps: int = 1

    @property
    def iteration_seconds(self) -> float:
        """The step and the wait before it: the time base of throughput and MFU."""
        return self.step_seconds + self.input_wait_seconds


class StepTimer:
    """Times optimizer steps; the first ``warmup_steps`` are counted but not reported.

    ``device``: a CUDA device is timed with CUDA events on its current stream; anything else (or
    ``force_cpu=True``) with ``clock``, the host clock, which tests replace with a fake.
    """

    def __init__(
        self,
        warmup_steps: int = 2,
        *,
        device: torch.device | str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        force_cpu: bool = False,
    ) -> None:
        self.warmup_steps = _validate.whole_number(warmup_steps, name="warmup_steps", minimum=0)
        device = torch.device(device) if device is not None else None
        self.uses_cuda_events = (
            not force_cpu and torch.cuda.is_available() and (device is None or device.type == "cuda")
        )
        self._device = device if self.uses_cuda_events else None
        self._clock = clock
        self.steps_started = 0
        self._open = False
        self._measuring = False  # whether the open step will be reported
        self._last_stop: float | None = None
        self._start_time = 0.0  # host-clock path
        self._start_event: torch.cuda.Event | None = None  # CUDA path
        self._input_wait = 0.0
        self._finished: list[StepTiming] = []  # host-clock path
        # CUDA path, unresolved: (end of the previous step or None, start, stop) per step
        self._recorded: list[tuple[torch.cuda.Event | None, torch.cuda.Event, torch.cuda.Event]] = []
        self._previous_stop: torch.cuda.Event | None = None  # where the next step's input wait begins
        self._wait_began: torch.cuda.Event | None = None  # ... and where the open step's began
        self._spare_events: list[torch.cuda.Event] = []

    @property
    def measuring(self) -> bool:
        """Whether the open step is past warm-up and will appear in ``read()``."""
        return self._measuring

    def start(self) -> None:
        """The optimizer step begins."""
        now = self._clock()
        if self._open:
            raise ValueError("StepTimer.start() called twice: call stop() at the end of each step first")
        self._open = True
        self._measuring = self.steps_started >= self.warmup_steps
        self.steps_started += 1
        if not self._measuring:
            return
        self._input_wait = now - self._last_stop if self._last_stop is not None else 0.0
        if self.uses_cuda_events:
            self._wait_began = self._previous_stop
            self._start_event = self._record_event()
        else:
            self._start_time = now

    def stop(self) -> None:
        """The optimizer step ends (its kernels may still be running on the GPU)."""
        if not self._open:
            raise ValueError(
                "StepTimer.stop() called without start(): call start() at the beginning of each step"
            )
        self._open = False
        if self._measuring:
            if self.uses_cuda_events:
                stop = self._record_event()
                assert self._start_event is not None  # recorded by start() of a measured step
                self._recorded.append((self._wait_began, self._start_event, stop))
                self._previous_stop = stop
                self._last_stop = self._clock()
                if len(self._recorded) > _KEEP_STEPS:
                    self._resolve_finished_events()
                return
            now = self._clock()
            self._finished.append(StepTiming(now - self._start_time, self._input_wait))
            self._last_stop = now
            self._fold_old_timings()
            return
        self._previous_stop = None  # an unmeasured step is nobody's input wait
        self._last_stop = self._clock()

    def discard_current(self) -> None:
        """Leave the open step out of the timings (it did one-off work, such as building the FLOP engine)."""
        if self._open and self._measuring:
            self._measuring = False
            if self._start_event is not None:
                self._spare_events.append(self._start_event)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is neither step time nor input wait: for the meter's own log-time work.

        Reading CUDA events waits for the GPU to drain; that wait must not look like a slow data loader.
        """
        begin = self._clock()
        try:
            yield
        finally:
            spent = self._clock() - begin
            if self._last_stop is not None:
                self._last_stop += spent
            if self._open and self._measuring and not self.uses_cuda_events:
                self._start_time += spent
            if self.uses_cuda_events and self._previous_stop is not None and not self._open:
                # The device idled while this read waited for it: the next input wait starts now.
                self._previous_stop = torch.cuda.Event(enable_timing=True)
                self._previous_stop.record(torch.cuda.current_stream(self._device))

    def read(self) -> list[StepTiming]:
        """Timings of the steps finished since the last read, oldest first; resolves CUDA events.

        The entries' ``steps`` add up to the steps finished; the last entries are single steps.
        """
        if self._recorded:
            self._recorded[-1][2].synchronize()  # stream order: every earlier event has completed too
            self._resolve(len(self._recorded))
        finished, self._finished = self._finished, []
        return finished

    def _resolve_finished_events(self) -> None:
        """Resolve the oldest recorded steps whose events the GPU has passed (``query``: no wait)."""
        done = 0
        for _, _, stop in self._recorded[: len(self._recorded) - _KEEP_STEPS // 2]:
            if not stop.query():
                break
            done += 1
        if done:
            self._resolve(done)

    def _resolve(self, count: int) -> None:
        """Turn the oldest ``count`` recorded steps into timings and reuse their events."""
        resolved: dict[int, torch.cuda.Event] = {}
        for wait_began, start, stop in self._recorded[:count]:
            wait = wait_began.elapsed_time(start) / 1000.0 if wait_began is not None else 0.0
            self._finished.append(StepTiming(start.elapsed_time(stop) / 1000.0, max(wait, 0.0)))
            resolved.update((id(event), event) for event in (wait_began, start, stop) if event is not None)
        del self._recorded[:count]
        still_needed = {id(self._previous_stop)} | ({id(self._wait_began)} if self._open else set())
        still_needed |= {id(event) for step in self._recorded for event in step if event is not None}
        self._spare_events += [event for key, event in resolved.items() if key not in still_needed]
        self._fold_old_timings()

    def _fold_old_timings(self) -> None:
        """Past ``_KEEP_STEPS`` finished timings, fold the oldest half into one entry."""
        if len(self._finished) <= _KEEP_STEPS:
            return
        cut = len(self._finished) - _KEEP_STEPS // 2
        old = self._finished[:cut]
        folded = StepTiming(
            sum(t.step_seconds for t in old),
            sum(t.input_wait_seconds for t in old),
            sum(t.steps for t in old),
        )
        self._finished[:cut] = [folded]

    def _record_event(self) -> torch.cuda.Event:
        event = self._spare_events.pop() if self._spare_events else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event
