"""Step times without a host sync on the hot path.

On CUDA each optimizer step is bracketed by two timing events on the current stream (one, its stop,
where the step begins while the device still runs the last one: ``_step_events.py``); they are
resolved only when the timings are read (at log time), with one wait on the last event. A
``torch.cuda.synchronize()`` per step costs step time (``benchmarks/RESULTS.md``, "Overhead against
no measurement and against ThroughputMonitor": 1.0054-1.0064x on a 159 ms H100 step, up to 1.0124x on a
22 ms one), which is more than an MFU meter may cost. Without CUDA the host
clock is exact, since the work it brackets has finished when the step returns.

Input wait is the time between one step's end and the next step's start in which the device sat
idle: the data loader, the framework's bookkeeping, everything that is not the step itself. On
CUDA it is read from the GPU's timeline (the previous step's end event to this step's start event),
so host work that overlaps with queued GPU work costs nothing, as it costs nothing in training.
The meter's own log-time reads are not left out: what they cost the run is counted apart
(``StepTimer.meter_work``: its own seconds, part of the iteration, never input wait), so the time base
is the wall clock. On CUDA that is the read's host time, capped by the device's idle time before the
next step (the gap between the two steps' events): a read that runs while the device still works on
queued steps costs the run nothing, and is counted as nothing. Only one-off work that is no
training is left out (``StepTimer.paused``): evaluation runs, checkpoint saves, a profile's analysis.

A read does not wait for the GPU: it resolves the steps whose end the GPU has already passed
(``Event.query``) and leaves the others for the next read (``completed_steps`` and ``read``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from . import _validate
from ._step_events import StepEvents
from ._step_timing import StepTiming

__all__ = ["StepTimer", "StepTiming"]

# Finished steps kept one by one before the oldest are folded into one entry: bounds memory in a
# run that reads its metrics rarely (or never), while the last steps stay separate.
_KEEP_STEPS = 256


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
        self._clock = clock
        self.steps_started = 0
        self._open = False
        self._measuring = False  # whether the open step will be reported
        self._last_stop: float | None = None
        self._start_time = 0.0  # host-clock path
        self._input_wait = 0.0
        self._in_meter_work = False
        self._paused = False
        self._meter_seconds = 0.0  # the meter's work since the last step ended (host clock)
        self._step_meter_seconds = 0.0  # ... and before the open step
        self._meter_before_pause = 0.0  # CUDA path: the meter's work before a pause since the last step
        self._finished: list[StepTiming] = []  # resolved, oldest first
        self._events = StepEvents(device if self.uses_cuda_events else None)  # CUDA path, unresolved
        self._known_complete = 0  # unread steps the last ``completed_steps`` found finished

    @property
    def clock(self) -> Callable[[], float]:
        """The host clock (tests replace it with a fake)."""
        return self._clock

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
        meter_seconds, self._meter_seconds = self._meter_seconds, 0.0
        before_pause, self._meter_before_pause = self._meter_before_pause, 0.0
        if not self._measuring:
            return
        self._input_wait = now - self._last_stop if self._last_stop is not None else 0.0
        self._step_meter_seconds = meter_seconds if self._last_stop is not None else 0.0
        if self.uses_cuda_events:
            self._events.start(before_pause)
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
                self._events.stop(self._step_meter_seconds)
                self._last_stop = self._clock()
                if len(self._events.recorded) > _KEEP_STEPS:
                    self._resolve_finished_events()
                return
            now = self._clock()
            self._finished.append(
                StepTiming(now - self._start_time, self._input_wait, meter_seconds=self._step_meter_seconds)
            )
            self._last_stop = now
            self._fold_old_timings()
            return
        self._events.previous_stop = None  # an unmeasured step is nobody's input wait
        self._last_stop = self._clock()

    def leave_out_open_step(self) -> None:
        """Leave the open step out of the timings (it did one-off work, such as building the FLOP engine)."""
        if self._open and self._measuring:
            self._measuring = False
            self._events.leave_out_open_step()

    @contextmanager
    def meter_work(self) -> Iterator[None]:
        """Time spent inside between two steps is the meter's own (a read): counted in the next step's
        iteration as ``meter_seconds``, not as input wait, so MFU stays on the wall clock.

        On CUDA the host seconds inside are capped by the device's idle time before the next step
        (the gap between the steps' events) when the step is resolved: a read that runs while the
        device still works on queued steps costs the run nothing. No CUDA call: a read stays cheap.
        """
        if self._open or self._in_meter_work or self._paused:  # inside a step or a pause: part of it
            yield
            return
        self._in_meter_work = True
        begin = self._clock()
        try:
            yield
        finally:
            self._in_meter_work = False
            spent = self._clock() - begin
            self._meter_seconds += spent
            if self._last_stop is not None and not self.uses_cuda_events:
                self._last_stop += spent

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is neither step time nor input wait: for one-off work that is not
        training (evaluation, a checkpoint save, the profiled steps' syncs and analysis), never for what
        a run pays at every log. A pause inside a pause is part of it."""
        if self._paused:
            yield
            return
        self._paused = True
        begin = self._clock()
        try:
            yield
        finally:
            self._paused = False
            spent = self._clock() - begin
            if self._last_stop is not None:
                self._last_stop += spent
            if self._open and self._measuring and not self.uses_cuda_events:
                self._start_time += spent
            if self.uses_cuda_events and self._events.previous_stop is not None and not self._open:
                # The next input wait starts after the paused work. The meter's work before the pause
                # is no longer inside that wait.
                self._events.restart_wait()
                self._meter_before_pause += self._meter_seconds
                self._meter_seconds = 0.0

    @property
    def _resolved_steps(self) -> int:
        """Unread steps whose timings are resolved already (the oldest ones)."""
        return sum(timing.steps for timing in self._finished)

    @property
    def unread_steps(self) -> int:
        """Measured steps finished since the last read, resolved or not."""
        return self._resolved_steps + len(self._events.recorded)

    def completed_steps(self) -> int:
        """How many of the unread steps the device has finished, asked without waiting.

        CUDA events complete in stream order, so the newest finished one tells: one or two queries.
        """
        self._known_complete = self._resolved_steps + self._events.finished()
        return self._known_complete

    def end_event(self, steps: int) -> torch.cuda.Event | None:
        """The event at the end of the ``steps``-th unread step, if it is still unresolved (CUDA)."""
        return self._events.stop_event(steps - self._resolved_steps - 1)

    def read(self, steps: int | None = None) -> list[StepTiming]:
        """Timings of the oldest ``steps`` unread steps (default: all), oldest first; the rest stay
        for the next read.

        Resolves CUDA events: waits for the device only for steps it has not finished yet (none when
        ``steps`` is at most ``completed_steps()``). ``steps`` must end at a step boundary: resolved
        entries that fold several steps together are taken whole. The entries' ``steps`` add up to
        the steps read; the last entries are single steps.
        """
        if steps is None:
            steps = self.unread_steps
        resolved = self._resolved_steps
        if steps < resolved:
            raise ValueError(f"cannot read {steps} steps: {resolved} are already resolved together")
        count = min(steps - resolved, len(self._events.recorded))
        if count:
            if resolved + count > self._known_complete:
                self._events.wait_for(count)  # stream order: every earlier one completed too
            self._resolve(count)
        self._known_complete = 0
        finished, self._finished = self._finished, []
        return finished

    def _resolve_finished_events(self) -> None:
        """Resolve the oldest recorded steps whose events the GPU has passed (``query``: no wait)."""
        done = self._events.passed(len(self._events.recorded) - _KEEP_STEPS // 2)
        if done:
            self._resolve(done)

    def _resolve(self, count: int) -> None:
        """Turn the oldest ``count`` recorded steps into timings and reuse their events."""
        self._events.resolve(count, self._finished, step_open=self._open)
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
            sum(t.meter_seconds for t in old),
        )
        self._finished[:cut] = [folded]
