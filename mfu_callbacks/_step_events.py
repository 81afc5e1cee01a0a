"""The step timer's CUDA events (``timer.py``): recorded per measured step, resolved only at a read,
and reused once resolved, so that a steady run allocates none.

Each measured step keeps where its input wait began (the previous step's end, or None), its start and
stop events, the host seconds of the meter's work before it inside that wait, and of its work before
a pause (outside the wait: the pause moved its beginning).
"""

from __future__ import annotations

import torch

from ._step_timing import StepTiming

_Recorded = tuple[torch.cuda.Event | None, torch.cuda.Event, torch.cuda.Event, float, float]


class StepEvents:
    """The measured steps' events not yet resolved (oldest first), and the spare ones for reuse."""

    def __init__(self, device: torch.device | None) -> None:
        # The device's index: ``current_stream`` resolves an int fastest (twice a step).
        self._device = device.index if device is not None and device.index is not None else device
        self.recorded: list[_Recorded] = []
        self.previous_stop: torch.cuda.Event | None = None  # where the next step's input wait begins
        self._wait_began: torch.cuda.Event | None = None  # ... and where the open step's began
        self._start: torch.cuda.Event | None = None  # the open (or last) measured step's start
        self._open_meter_before_pause = 0.0  # the open step's
        self._spare: list[torch.cuda.Event] = []

    def start(self, meter_before_pause: float) -> None:
        """A measured step begins: its start event, and where its input wait began."""
        self._wait_began = self.previous_stop
        self._open_meter_before_pause = meter_before_pause if self.previous_stop is not None else 0.0
        self._start = self._record()

    def stop(self, meter_seconds: float) -> None:
        """The measured step ends: its stop event, where the next step's input wait begins."""
        stop = self._record()
        assert self._start is not None  # recorded by start() of a measured step
        self.recorded.append(
            (self._wait_began, self._start, stop, meter_seconds, self._open_meter_before_pause)
        )
        self.previous_stop = stop

    def leave_out_open_step(self) -> None:
        """The open step is not measured after all: its start event is spare."""
        if self._start is not None:
            self._spare.append(self._start)

    def restart_wait(self) -> None:
        """After a pause between steps: the next input wait starts now (the device idled or ran the
        paused work, however many kernels)."""
        replaced, self.previous_stop = self.previous_stop, self._record()
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
            between = max(wait_began.elapsed_time(start) / 1000.0, 0.0) if wait_began is not None else 0.0
            meter = min(meter, between)  # the device idled this long at most because of the meter
            timings.append(
                StepTiming(start.elapsed_time(stop) / 1000.0, between - meter, meter_seconds=meter + earlier)
            )
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
