"""The step timer's CUDA events (``timer.py``): recorded per measured step, resolved only at a read,
and reused once resolved, so that a steady run allocates none.

Each measured step keeps where its input wait began (the previous step's end, or None), its start and
stop events, the host seconds of the meter's work before it inside that wait, and of its work before
a pause (outside the wait: the pause moved its beginning).

A step that begins while the device still runs the previous one (its stop event not passed: the host
runs ahead, as it does in a training loop bound by the GPU) records no start event: the device sat
idle for none of the time between the two steps, so the step begins where the previous one ends and
its input wait is 0, which is what a start event would measure. That is one event record per step
instead of two, for one query: in the loop a record costs the host about 48 µs on an H100 host, a
query about 1 (``benchmarks/RESULTS.md``, "The step's CUDA calls in the loop").
"""

from __future__ import annotations

import torch

from ._step_timing import StepTiming

# (where the input wait began, start (None: where the previous step stopped), stop, the meter's host
# seconds in the wait, before a pause)
_Recorded = tuple[torch.cuda.Event | None, torch.cuda.Event | None, torch.cuda.Event, float, float]


class StepEvents:
    """The measured steps' events not yet resolved (oldest first), and the spare ones for reuse."""

    def __init__(self, device: torch.device | None) -> None:
        # The device's index: ``current_stream`` resolves an int fastest (at every record).
        self._device = device.index if device is not None and device.index is not None else device
        self.recorded: list[_Recorded] = []
        self.previous_stop: torch.cuda.Event | None = None  # where the next step's input wait begins
        self._after_pause = False  # ``previous_stop`` marks a pause's end, not the last step's stop
        self._wait_began: torch.cuda.Event | None = None  # ... and where the open step's began
        self._start: torch.cuda.Event | None = None  # the open (or last) measured step's start
        self._open_meter_before_pause = 0.0  # the open step's
        self._spare: list[torch.cuda.Event] = []

    def start(self, meter_before_pause: float) -> None:
        """A measured step begins: its start event, and where its input wait began."""
        previous = self._wait_began = self.previous_stop
        self._open_meter_before_pause = meter_before_pause if previous is not None else 0.0
        if previous is not None and not self._after_pause and not previous.query():
            self._start = None  # the device still runs the previous step: this one begins where it ends
        else:
            self._start = self._record()

    def stop(self, meter_seconds: float) -> None:
        """The measured step ends: its stop event, where the next step's input wait begins."""
        stop = self._record()
        self.recorded.append(
            (self._wait_began, self._start, stop, meter_seconds, self._open_meter_before_pause)
        )
        self.previous_stop = stop
        self._after_pause = False

    def leave_out_open_step(self) -> None:
        """The open step is not measured after all: its start event is spare."""
        if self._start is not None:
            self._spare.append(self._start)

    def restart_wait(self) -> None:
        """After a pause between steps: the next input wait starts now (the device idled or ran the
        paused work, however many kernels)."""
        replaced, self.previous_stop = self.previous_stop, self._record()
        self._after_pause = True  # the paused work may still run: the next step records its start
        if not (self.recorded and self.recorded[-1][2] is replaced):  # resolved already: reuse it
            assert replaced is not None
            self._spare.append(replaced)

    def finished(self) -> int:
        """How many of the recorded steps the device has finished, asked without waiting: CUDA events
        complete in stream order, so the newest finished one tells."""
        for index in range(len(self.recorded) - 1, -1, -1):
            if self.recorded[index][2].query():
                return index + 1
        return 0

    def passed(self, limit: int) -> int:
        """How many of the oldest ``limit`` recorded steps the device has passed (``query``: no wait)."""
        done = 0
        for _, _, stop, _, _ in self.recorded[:limit]:
            if not stop.query():
                break
            done += 1
        return done

    def stop_event(self, index: int) -> torch.cuda.Event | None:
        """The stop event of the ``index``-th recorded step, None past them."""
        return self.recorded[index][2] if 0 <= index < len(self.recorded) else None

    def wait_for(self, count: int) -> None:
        """Wait for the device to finish the oldest ``count`` steps (stream order: the last one tells)."""
        self.recorded[count - 1][2].synchronize()

    def resolve(self, count: int, timings: list[StepTiming], *, step_open: bool) -> None:
        """Append the oldest ``count`` recorded steps to ``timings``; their events are reused."""
        resolved: dict[int, torch.cuda.Event] = {}
        for wait_began, start, stop, meter, earlier in self.recorded[:count]:
            if start is None:  # began while the device ran the previous step: no idle time between
                assert wait_began is not None
                between, step_seconds = 0.0, wait_began.elapsed_time(stop) / 1000.0
            else:
                between = max(wait_began.elapsed_time(start) / 1000.0, 0.0) if wait_began is not None else 0.0
                step_seconds = start.elapsed_time(stop) / 1000.0
            meter = min(meter, between)  # the device idled this long at most because of the meter
            timings.append(StepTiming(step_seconds, between - meter, meter_seconds=meter + earlier))
            resolved.update((id(event), event) for event in (wait_began, start, stop) if event is not None)
        del self.recorded[:count]
        still_needed = {id(self.previous_stop)} | ({id(self._wait_began)} if step_open else set())
        still_needed |= {
            id(event)
            for wait_began, start, stop, _, _ in self.recorded
            for event in (wait_began, start, stop)
            if event is not None
        }
        self._spare += [event for key, event in resolved.items() if key not in still_needed]

    def _record(self) -> torch.cuda.Event:
        event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event
