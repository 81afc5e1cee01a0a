"""The step timer, against a fake clock, and its CUDA-event path against fake events."""

from __future__ import annotations

import pytest
import torch

from mfu_callbacks._step_events import StepEvents
from mfu_callbacks.timer import StepTimer, StepTiming
from tests.helpers.fakes import FakeClock


def timed_step(timer: StepTimer, clock: FakeClock, *, wait: float, seconds: float) -> None:
    clock.advance(wait)
    timer.start()
    clock.advance(seconds)
    timer.stop()


def test_step_seconds_and_input_wait_on_the_host_clock():
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    timed_step(timer, clock, wait=5.0, seconds=0.5)  # nothing ran before the first step: no wait to speak of
    timed_step(timer, clock, wait=0.25, seconds=1.5)
    timed_step(timer, clock, wait=0.0, seconds=2.0)
    assert timer.read() == [StepTiming(0.5, 0.0), StepTiming(1.5, 0.25), StepTiming(2.0, 0.0)]


def test_read_returns_each_step_once():
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    assert len(timer.read()) == 1
    assert timer.read() == []
    timed_step(timer, clock, wait=0.5, seconds=3.0)
    assert timer.read() == [StepTiming(3.0, 0.5)]


def test_warmup_steps_are_counted_but_not_reported():
    clock = FakeClock()
    timer = StepTimer(2, clock=clock, force_cpu=True)
    measuring = []
    for seconds in (10.0, 20.0, 1.0, 2.0):
        clock.advance(0.5)
        timer.start()
        measuring.append(timer.measuring)
        clock.advance(seconds)
        timer.stop()
    assert measuring == [False, False, True, True]
    assert timer.steps_started == 4
    # The first reported step's wait runs from the last warm-up step's end.
    assert timer.read() == [StepTiming(1.0, 0.5), StepTiming(2.0, 0.5)]


def test_a_discarded_step_is_not_reported():
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    timer.start()
    timer.leave_out_open_step()
    clock.advance(30.0)
    timer.stop()
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    assert timer.read() == [StepTiming(1.0, 0.5)]


def test_time_spent_paused_between_steps_is_not_input_wait():
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    clock.advance(0.25)
    with timer.paused():
        clock.advance(7.0)  # e.g. the meter waiting for the GPU at log time
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    assert timer.read()[-1] == StepTiming(1.0, 0.75)


def test_misuse_raises_clear_errors():
    timer = StepTimer(0, force_cpu=True)
    with pytest.raises(ValueError, match="stop\\(\\) called without start\\(\\)"):
        timer.stop()
    timer.start()
    with pytest.raises(ValueError, match="start\\(\\) called twice"):
        timer.start()
    with pytest.raises(ValueError, match="warmup_steps"):
        StepTimer(-1)


def test_cpu_device_and_force_cpu_use_the_host_clock():
    assert not StepTimer(device="cpu").uses_cuda_events
    assert not StepTimer(device="cuda", force_cpu=True).uses_cuda_events


class FakeEvent:
    """Stands in for ``torch.cuda.Event``: takes the fake clock's time when recorded, and logs every query."""

    created: list[FakeEvent] = []
    log: list[str] = []
    clock: FakeClock
    device_time = float("inf")  # the device has passed every event recorded up to this time

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.time: float | None = None
        FakeEvent.created.append(self)

    def record(self, stream=None) -> None:
        self.time = FakeEvent.clock()
        FakeEvent.log.append("record")

    def synchronize(self) -> None:
        FakeEvent.log.append("synchronize" if self.query() else "wait for the device")

    def query(self) -> bool:
        """Whether the device has passed the event: those recorded up to ``device_time``."""
        return self.time is not None and self.time <= FakeEvent.device_time

    def elapsed_time(self, end: FakeEvent) -> float:
        FakeEvent.log.append("elapsed_time")
        return (end.time - self.time) * 1000.0  # milliseconds, like CUDA


@pytest.fixture
def fake_cuda(monkeypatch):
    clock = FakeClock()
    FakeEvent.created, FakeEvent.log, FakeEvent.clock = [], [], clock
    FakeEvent.device_time = float("inf")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    return clock


def test_cuda_events_are_resolved_only_at_read_with_one_wait(fake_cuda):
    clock = fake_cuda
    timer = StepTimer(1, device="cuda", clock=clock)
    assert timer.uses_cuda_events
    for seconds in (9.0, 0.5, 1.5, 1.0):
        timed_step(timer, clock, wait=0.25, seconds=seconds)
    assert set(FakeEvent.log) == {"record"}, "no event may be waited for or read before read()"
    assert FakeEvent.log.count("record") == 6  # two per step after the warm-up step
    timings = timer.read()
    # Three step durations and two waits (the first measured step follows an unmeasured one).
    assert FakeEvent.log[6:] == ["synchronize"] + ["elapsed_time"] * 5
    assert timings == [StepTiming(0.5, 0.0), StepTiming(1.5, 0.25), StepTiming(1.0, 0.25)]


def test_cuda_events_are_recycled_after_a_read(fake_cuda):
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)
    for _ in range(3):
        timed_step(timer, clock, wait=0.0, seconds=1.0)
    timer.read()
    for _ in range(3):
        timed_step(timer, clock, wait=0.0, seconds=1.5)
    timer.read()
    created = len(FakeEvent.created)
    for _ in range(3):
        timed_step(timer, clock, wait=0.0, seconds=2.0)
    assert [t.step_seconds for t in timer.read()] == [2.0, 2.0, 2.0]
    assert len(FakeEvent.created) == created, "steady state allocates no events"


def test_resolved_events_are_reused_only_where_no_step_still_needs_them(fake_cuda):
    clock = fake_cuda
    events = StepEvents(None)
    for _ in range(2):
        events.start(0.0)
        clock.advance(1.0)
        events.stop(0.0)
    events.start(0.0)  # a third step is open: its input wait began at the second step's stop
    timings: list[StepTiming] = []
    events.resolve(2, timings, step_open=True)
    assert [timing.step_seconds for timing in timings] == [1.0, 1.0]
    created = len(FakeEvent.created)
    events.stop(0.0)
    events.start(0.0)
    events.stop(0.0)
    assert len(FakeEvent.created) == created, "the first step's two events and the second's start are spare"
    events.start(0.0)
    assert len(FakeEvent.created) == created + 1, "the second step's stop begins the third's wait: kept"


def test_on_cuda_a_read_between_steps_is_not_input_wait(fake_cuda):
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    with timer.paused():
        clock.advance(5.0)  # waiting for the device to drain, then logging
        timer.read()
    timed_step(timer, clock, wait=0.25, seconds=1.0)
    assert timer.read() == [StepTiming(1.0, 0.25)]


def test_on_cuda_a_read_takes_the_steps_the_device_finished_and_leaves_the_rest(fake_cuda):
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)
    for seconds in (1.0, 2.0, 3.0):
        timed_step(timer, clock, wait=0.5, seconds=seconds)
    FakeEvent.device_time = clock() - 1.0  # the device is still in the third step
    assert timer.completed_steps() == 2 and timer.unread_steps == 3
    assert [t.step_seconds for t in timer.read(timer.completed_steps())] == [1.0, 2.0]
    assert "wait for the device" not in FakeEvent.log
    FakeEvent.device_time = float("inf")
    assert timer.read() == [StepTiming(3.0, 0.5)]


def test_the_meters_work_between_steps_is_its_own_time_not_input_wait(fake_cuda):
    """On CUDA, the read's host time, capped by the device's idle time before the next step."""
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    clock.advance(0.25)  # the framework's own logging
    with timer.meter_work(), timer.meter_work():  # nested: counted once
        clock.advance(2.0)
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    second = timer.read()[-1]
    assert second == StepTiming(1.0, 0.75, meter_seconds=2.0)
    assert second.iteration_seconds == pytest.approx(3.75)


def test_the_meters_work_on_the_host_clock_is_its_own_time_not_input_wait():
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    with timer.meter_work():
        clock.advance(2.0)
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    assert timer.read()[-1] == StepTiming(1.0, 0.5, meter_seconds=2.0)


def test_a_pause_holds_whatever_runs_inside_it_once():
    """Evaluation or a checkpoint save: a read or another pause inside it is part of it, counted once."""
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    clock.advance(0.25)
    with timer.paused():
        clock.advance(3.0)
        with timer.meter_work():
            clock.advance(1.0)
        with timer.paused():
            clock.advance(2.0)
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    assert timer.read()[-1] == StepTiming(1.0, 0.75)


def test_on_cuda_a_pause_over_many_forwards_leaves_the_read_before_it_as_the_meters_time(fake_cuda):
    """A read, then an evaluation (its kernels and the host's gaps between them), then the next batch:
    the read stays the meter's own time, the evaluation is nobody's, the wait after it is input wait."""
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)
    timed_step(timer, clock, wait=0.0, seconds=1.0)
    with timer.meter_work():
        clock.advance(2.0)
    with timer.paused():
        for _ in range(50):  # eval forwards, queued on the device one after the other
            clock.advance(0.1)
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    second = timer.read()[-1]
    assert second.step_seconds == pytest.approx(1.0)
    assert second.input_wait_seconds == pytest.approx(0.5)
    assert second.meter_seconds == pytest.approx(2.0)

    def read_pause_and_three_steps() -> None:
        with timer.meter_work():  # a read records no event: it is timed on the host
            clock.advance(1.0)
        with timer.paused():
            clock.advance(1.0)
        for _ in range(3):
            timed_step(timer, clock, wait=0.0, seconds=1.0)
        timer.read()

    read_pause_and_three_steps()
    created = len(FakeEvent.created)
    read_pause_and_three_steps()
    assert len(FakeEvent.created) == created  # steady state: the pause's event is recycled like the steps'


def test_a_step_begun_while_the_device_runs_the_last_one_records_only_its_stop(fake_cuda):
    """The host runs ahead of the device (a loop bound by the GPU): a step begins where the last one
    ends on the device, with no input wait (the device never idled), and the read before it cost the
    run nothing; once the device has passed the last stop, the step records its start again and the
    idle time is input wait."""
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)
    began = clock()
    FakeEvent.device_time = float("-inf")  # queued work all along: no event is passed yet
    for wait, seconds in ((0.0, 1.0), (0.25, 1.0)):
        timed_step(timer, clock, wait=wait, seconds=seconds)
    with timer.meter_work():  # a read while the device works
        clock.advance(2.0)
    timed_step(timer, clock, wait=0.5, seconds=2.0)
    assert FakeEvent.log.count("record") == 4  # the first step's start and stop, then a stop each
    FakeEvent.device_time = float("inf")
    timings = timer.read()
    assert timings == [StepTiming(1.0, 0.0), StepTiming(1.25, 0.0), StepTiming(4.5, 0.0)]
    assert sum(t.iteration_seconds for t in timings) == pytest.approx(clock() - began)  # the same wall clock
    timed_step(timer, clock, wait=0.5, seconds=1.0)  # the device had passed the last stop: it idled
    assert FakeEvent.log.count("record") == 6
    assert timer.read() == [StepTiming(1.0, 0.5)]


def test_after_a_pause_or_an_unmeasured_step_a_step_records_its_start_however_busy_the_device(fake_cuda):
    clock = fake_cuda
    timer = StepTimer(1, device="cuda", clock=clock)
    FakeEvent.device_time = float("-inf")
    timed_step(timer, clock, wait=0.0, seconds=1.0)  # warm-up: unmeasured
    timed_step(timer, clock, wait=0.25, seconds=1.0)  # no previous stop to begin from
    assert FakeEvent.log.count("record") == 2
    with timer.paused():  # evaluation: its kernels may still run when the next step begins
        clock.advance(3.0)
    timed_step(timer, clock, wait=0.5, seconds=1.0)
    assert FakeEvent.log.count("record") == 5  # the pause's end, the step's start and stop
    FakeEvent.device_time = float("inf")
    assert timer.read() == [StepTiming(1.0, 0.0), StepTiming(1.0, 0.5)]


def test_steps_that_record_only_their_stop_recycle_their_events_too(fake_cuda):
    clock = fake_cuda
    timer = StepTimer(0, device="cuda", clock=clock)

    def busy_steps_then_a_read() -> None:
        FakeEvent.device_time = float("-inf")
        for _ in range(4):
            timed_step(timer, clock, wait=0.0, seconds=1.0)
        FakeEvent.device_time = clock() - 1.0  # the last step still runs: read up to the one before
        timer.read(timer.completed_steps())

    for _ in range(2):  # the spare events fill up
        busy_steps_then_a_read()
    created = len(FakeEvent.created)
    for _ in range(5):
        busy_steps_then_a_read()
    assert len(FakeEvent.created) == created
