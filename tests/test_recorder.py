"""The step recorder, the meter's hot path: which micro-batches a step counts, which steps are left out,
and what a read takes. A fake engine of known tokens and a fake clock; expected values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfu_callbacks._recorder import StepRecorder
from mfu_callbacks.flops import BatchError
from mfu_callbacks.flops.features import HARDWARE, MODEL, Feature
from mfu_callbacks.timer import StepTimer
from tests.helpers.fakes import FakeClock, FakeEngine, batch


class PickyEngine(FakeEngine):
    """Cannot count a batch marked ``odd``."""

    def count(self, fake_batch: dict[str, int]) -> torch.Tensor:
        if fake_batch.get("odd"):
            raise BatchError("no input_ids in this batch")
        return super().count(fake_batch)


def recorder(clock: FakeClock, *, warmup_steps: int = 0, engine: FakeEngine | None = None) -> StepRecorder:
    timer = StepTimer(warmup_steps, clock=clock, force_cpu=True)
    return StepRecorder(nn.Linear(2, 2), timer, engine or FakeEngine(), forward=None, token_counter=None)


def step(rec: StepRecorder, clock: FakeClock, *batches: dict, seconds: float = 1.0) -> None:
    rec.start_step(batches[0])
    for micro_batch in batches[1:]:
        rec.add_batch(micro_batch)
    clock.advance(seconds)
    rec.end_step()


def tokens(features: torch.Tensor) -> tuple[int, int]:
    return int(features[MODEL, Feature.TOKENS]), int(features[HARDWARE, Feature.TOKENS])


def test_a_read_sums_every_micro_batch_of_its_steps_and_keeps_the_last_step_apart():
    clock = FakeClock()
    rec = recorder(clock)
    step(rec, clock, batch(100, padded=128), batch(50), seconds=1.0)
    step(rec, clock, batch(30, padded=32), seconds=2.0)
    assert rec.unread_steps == 2
    timings, counted = rec.drain()
    assert counted is not None
    window, last = counted
    assert tokens(window) == (180, 210) and tokens(last) == (30, 32)
    assert [timing.steps for timing in timings] == [1, 1]
    assert rec.unread_steps == 0 and rec.drain()[1] is None  # nothing unread: no counts


def test_warm_up_steps_are_neither_timed_nor_counted():
    clock = FakeClock()
    engine = FakeEngine()
    rec = recorder(clock, warmup_steps=2, engine=engine)
    for size in (1000, 2000, 7):
        step(rec, clock, batch(size))
    assert rec.unread_steps == 1
    _, counted = rec.drain()
    assert counted is not None and tokens(counted[0]) == (7, 7)
    assert engine.counted == 1  # the warm-up batches were never counted


def test_a_step_left_out_counts_nothing_and_the_next_counts_alone():
    clock = FakeClock()
    rec = recorder(clock)
    rec.start_step(batch(500))
    rec.leave_out_open_step()
    rec.add_batch(batch(600))  # later micro-batches of the step left out are not counted either
    rec.end_step()
    step(rec, clock, batch(40))
    assert rec.unread_steps == 1
    _, counted = rec.drain()
    assert counted is not None and tokens(counted[0]) == (40, 40)


def test_an_uncountable_micro_batch_costs_its_whole_step():
    clock = FakeClock()
    rec = recorder(clock, engine=PickyEngine())
    step(rec, clock, batch(100), {"odd": True}, batch(200))
    step(rec, clock, batch(9))
    assert rec.steps_left_out == 1 and rec.unread_steps == 1
    _, counted = rec.drain()
    assert counted is not None and tokens(counted[0]) == (9, 9)


def test_steps_must_open_and_close_in_turn():
    rec = recorder(FakeClock())
    with pytest.raises(ValueError, match="outside a step"):
        rec.add_batch(batch(1))
    with pytest.raises(ValueError, match="without start_step"):
        rec.end_step()
    rec.start_step()
    with pytest.raises(ValueError, match="while a step is open"):
        rec.start_step()
    with pytest.raises(TypeError, match="got None"):
        rec.add_batch(None)
