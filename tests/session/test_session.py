"""The session under each integration (``_session.py``): what it saves in a checkpoint and how it
resumes, with a fake engine and clock; expected values worked out by hand."""

from __future__ import annotations

import pytest
from torch import nn

from mfu_callbacks import MFUOptions
from mfu_callbacks._session import MeterSession
from tests.helpers.fakes import FakeClock, batch, make_meter


def ran_two_steps(session: MeterSession, clock: FakeClock) -> None:
    for _ in range(2):
        session.begin_step(batch(1000))
        clock.advance(1.0)
        session.end_step()


def test_a_state_loaded_before_the_meter_exists_is_saved_again_and_continued_at_attach():
    clock = FakeClock()
    first = MeterSession(MFUOptions(peak_tflops=1, warmup_steps=0), "test")
    assert first.state_dict() == {}  # no meter yet: nothing to save
    first.attach(nn.Linear(2, 2))
    first.meter = make_meter(clock)
    ran_two_steps(first, clock)
    first.read()
    state = first.state_dict()
    assert state

    resumed = MeterSession(MFUOptions(peak_tflops=1, warmup_steps=0), "test")
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint saved before the meter exists loses nothing
    resumed.attach(nn.Linear(2, 2))
    assert resumed.meter is not None and resumed.optimizer_steps == first.optimizer_steps == 2
    assert resumed.state_dict() == state  # the new meter holds the first run's totals
    fresh = MeterSession(MFUOptions(peak_tflops=1, warmup_steps=0), "test")
    fresh.attach(nn.Linear(2, 2))
    assert fresh.state_dict() != state  # (a meter without the loaded state saves other totals)


@pytest.mark.parametrize(
    "state",
    [{"version": 99}, {"version": 1, "run": "abc"}, {"version": 1, "run": {"steps": "x"}}, ["a", "b"]],
    ids=["other_version", "run_not_a_dict", "bad_value", "a_list"],
)
def test_a_corrupt_or_foreign_state_is_discarded_with_one_warning_and_measuring_goes_on(state):
    warnings: list[str] = []
    session = MeterSession(MFUOptions(peak_tflops=1, warmup_steps=0), "test", warn=warnings.append)
    clock = FakeClock()
    session.attach(nn.Linear(2, 2))
    session.meter = make_meter(clock)
    session.load_state_dict(state)
    for _ in range(2):
        session.begin_step(batch(1000))
        clock.advance(1.0)
        session.end_step()
    assert not session.guard.failed
    assert len(warnings) == 1 and "ignored" in warnings[0]
    assert session.read()["train/mfu"] > 0
