"""The meter under faults: odd batches, runs that never read, bad settings, a failing rank, resuming.

The fake clock, engine and peak are those of ``tests/helpers/fakes.py``; expected values are worked out by hand.
"""

from __future__ import annotations

import json
import logging
import math
import tracemalloc

import pytest
import torch
from torch import nn

from mfu_callbacks import MFUMeter, MFUOptions
from mfu_callbacks._step_counts import StepCounts
from mfu_callbacks.flops import BatchError
from mfu_callbacks.meter import join_reduction_as_failed
from mfu_callbacks.timer import StepTimer
from tests.helpers.fakes import (
    DeferredFeatures,
    FakeClock,
    FakeEngine,
    FakePeak,
    batch,
    make_meter,
    pretend_two_ranks,
    run_step,
)


class PickyEngine(FakeEngine):
    """Cannot count a batch marked ``odd`` (as the real engine cannot count an empty or unknown batch)."""

    def count(self, fake_batch):
        if fake_batch.get("odd"):
            raise BatchError("no input_ids in this batch")
        return super().count(fake_batch)


ODD = {"odd": True}


# -- one odd batch costs one step ------------------------------------------------------------------
def test_an_odd_batch_costs_its_step_and_measuring_goes_on(caplog):
    clock = FakeClock()
    meter = make_meter(clock, engine=PickyEngine())
    with caplog.at_level(logging.WARNING, logger="mfu_callbacks"):
        run_step(meter, clock, batch(1000), seconds=1.0)
        run_step(meter, clock, ODD, seconds=5.0)  # left out: neither its time nor its tokens count
        run_step(meter, clock, batch(1000), seconds=1.0)
        run_step(meter, clock, ODD, seconds=5.0)
    metrics = meter.metrics()
    # Two steps of 1e12 FLOPs in 2 s on a 1e12 FLOP/s GPU.
    assert metrics["mfu"] == pytest.approx(1.0)
    assert metrics["step_time"] == pytest.approx(1.0)
    said = [record for record in caplog.records if "left out" in record.getMessage()]
    assert len(said) == 1 and "no input_ids" in said[0].getMessage()


def test_an_odd_micro_batch_drops_what_its_step_counted_before():
    clock = FakeClock()
    meter = make_meter(clock, engine=PickyEngine())
    run_step(meter, clock, batch(1000), seconds=1.0)
    run_step(meter, clock, batch(1000), ODD, batch(1000), seconds=5.0)
    metrics = meter.metrics()
    assert metrics["mfu"] == pytest.approx(1.0)
    assert metrics["tokens_per_sec"] == pytest.approx(1000.0)


def test_a_first_batch_that_cannot_build_the_engine_waits_for_the_next():
    """The engine is built from the first countable batch; an odd first one does not end measuring."""
    built = []

    def from_model(model, first_batch, **options):
        if first_batch.get("odd"):
            raise BatchError("cannot count this batch")
        built.append(first_batch)
        return PickyEngine()

    clock = FakeClock()
    meter = MFUMeter(nn.Linear(2, 2), timer=StepTimer(0, clock=clock, force_cpu=True), peak=FakePeak())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mfu_callbacks.meter.FlopEngine.from_model", from_model)
        run_step(meter, clock, ODD, seconds=1.0)
        run_step(meter, clock, batch(1000), seconds=3.0)  # builds the engine: its time is left out
        run_step(meter, clock, batch(1000), seconds=1.0)
    assert len(built) == 1
    assert meter.metrics()["mfu"] == pytest.approx(1.0)


# -- bounded memory -----------------------------------------------------------------------------------
def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.slow  # thirty thousand steps
def test_thirty_thousand_steps_without_a_read_stay_within_two_megabytes():
    clock = FakeClock()
    meter = make_meter(clock)
    step = batch(100)
    for _ in range(2000):  # warm: buffers allocated, allocator pools filled
        run_step(meter, clock, step, seconds=0.001)
    tracemalloc.start()
    python_before, rss_before = tracemalloc.get_traced_memory()[0], _resident_bytes()
    for _ in range(30_000):
        run_step(meter, clock, step, seconds=0.001)
    python_growth = tracemalloc.get_traced_memory()[0] - python_before
    rss_growth = _resident_bytes() - rss_before
    tracemalloc.stop()
    assert python_growth < 2 * 2**20, f"Python objects grew by {python_growth / 2**20:.2f} MB"
    assert rss_growth < 2 * 2**20, f"resident memory grew by {rss_growth / 2**20:.2f} MB"
    metrics = meter.metrics()  # and nothing was lost: 32,000 steps of 1e11 FLOPs in 32 s on 1e12 FLOP/s
    assert metrics["mfu"] == pytest.approx(100.0)
    assert metrics["step_time"] == pytest.approx(0.001)


def test_folded_counts_keep_the_window_sum_and_the_last_step():
    counts, deferred = StepCounts(rows=4), DeferredFeatures()
    for step in range(1, 11):
        counts.add_deferred(*deferred(torch.full((2, 3), step, dtype=torch.int64)))
        counts.end_step()
    counts.add_deferred(*deferred(torch.full((2, 3), 100, dtype=torch.int64)))  # an open step keeps its count
    window, last = counts.drain()
    assert window.tolist() == [[55] * 3] * 2
    assert last.tolist() == [[10] * 3] * 2
    counts.end_step()
    window, last = counts.drain()
    assert window.tolist() == [[100] * 3] * 2 and last.tolist() == [[100] * 3] * 2


def test_folded_timings_keep_every_step():
    clock = FakeClock()
    timer = StepTimer(0, clock=clock, force_cpu=True)
    for step in range(1000):
        clock.advance(0.5)
        timer.start()
        clock.advance(1.0 + step)
        timer.stop()
    timings = timer.read()
    assert len(timings) <= 300
    assert sum(t.steps for t in timings) == 1000
    assert sum(t.step_seconds for t in timings) == pytest.approx(1000 + sum(range(1000)))
    assert sum(t.input_wait_seconds for t in timings) == pytest.approx(0.5 * 999)
    assert timings[-1].steps == 1 and timings[-1].step_seconds == pytest.approx(1000.0)


# -- settings are checked where they are written ------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        math.inf,
        math.nan,
        0,
        -1,
        1e-320,
        True,
        "989",
        1e7,
        pytest.param(10**400, id="10**400"),
        pytest.param(-(10**400), id="-10**400"),
    ],
)
def test_a_bad_peak_is_refused_at_construction(value):
    with pytest.raises(ValueError, match="peak_tflops"):
        MFUOptions(peak_tflops=value)
    with pytest.raises(ValueError, match="peak_tflops"):
        MFUMeter(nn.Linear(2, 2), peak_tflops=value)


@pytest.mark.parametrize("value", ["bf16-nonsense", 42, "foo-bar", torch.int64])
def test_a_bad_dtype_is_refused_at_construction(value):
    with pytest.raises(ValueError, match="unknown compute dtype"):
        MFUOptions(dtype=value)
    with pytest.raises(ValueError, match="unknown compute dtype"):
        MFUMeter(nn.Linear(2, 2), dtype=value, peak_tflops=1)


@pytest.mark.parametrize("value", ["bfloat16", "bf16", "bf16-mixed", torch.bfloat16, "16-mixed", "tf32"])
def test_every_dtype_spelling_is_accepted_alike_by_options_and_meter(value):
    assert MFUOptions(dtype=value).dtype == value
    assert MFUMeter(nn.Linear(2, 2), dtype=value, peak_tflops=1).peak is not None


@pytest.mark.parametrize(
    "value", ["1e-320", "inf", "fast", "-5", "1e400", "nan", pytest.param("1" + "0" * 400, id="401 digits")]
)
def test_a_bad_peak_in_the_environment_is_refused_at_construction(monkeypatch, value):
    monkeypatch.setenv("MFU_PEAK_TFLOPS", value)
    with pytest.raises(ValueError, match="MFU_PEAK_TFLOPS"):
        MFUOptions()
    with pytest.raises(ValueError, match="MFU_PEAK_TFLOPS"):
        MFUMeter(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "name, value",
    [
        ("warmup_steps", -1),
        ("warmup_steps", True),
        ("log_interval", 0),
        ("report", "yes"),
        ("silence_diagnostics", "padding_waste"),
        ("silence_diagnostics", None),
        ("silence_diagnostics", 3),
        ("silence_diagnostics", [None]),
        ("profile_steps", 101),
        ("profile_steps", 1_000_000),
        ("profile_steps", -1),
    ],
)
def test_other_bad_options_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        MFUOptions(**{name: value})


@pytest.mark.parametrize(
    "name, value",
    [("silence_diagnostics", None), ("silence_diagnostics", [None]), ("profile_steps", 1_000_000)],
)
def test_the_meter_refuses_them_alike(name, value):
    with pytest.raises(ValueError, match=name):
        MFUMeter(nn.Linear(2, 2), peak_tflops=1, **{name: value})


def test_the_limits_themselves_are_accepted():
    options = MFUOptions(peak_tflops=10**6, profile_steps=100, silence_diagnostics=iter(["padding_waste"]))
    assert options.peak_tflops == 1e6 and options.profile_steps == 100
    assert options.silence_diagnostics == ("padding_waste",)


# -- a failing rank never leaves the others waiting ---------------------------------------------------
class BrokenEngine(FakeEngine):
    def evaluate(self, features):
        raise RuntimeError("the engine broke")


def test_a_rank_whose_read_fails_still_joins_the_reduction(monkeypatch):
    calls: list = []
    pretend_two_ranks(monkeypatch, calls)
    clock = FakeClock()
    meter = make_meter(clock, engine=BrokenEngine())
    run_step(meter, clock, batch(1000), seconds=1.0)
    with pytest.raises(RuntimeError, match="the engine broke"):
        meter.metrics()
    assert len(calls) == 1, "the failing rank must enter the same reduction as the others"
    join_reduction_as_failed(read_at=1)  # as the session joins for a failed meter, after one step
    assert len(calls) == 2 and calls[0] == calls[1], "a failed rank sends a window of the same length"


def test_mfu_is_left_out_of_a_window_in_which_a_rank_failed(monkeypatch):
    calls: list = []
    pretend_two_ranks(monkeypatch, calls, other_failed=True)
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, batch(1000), seconds=1.0)
    metrics = meter.metrics()
    assert "mfu" not in metrics and "tokens_per_sec" not in metrics
    assert metrics["step_time"] == pytest.approx(1.0)


# -- resuming -------------------------------------------------------------------------------------------
def test_a_resumed_meter_continues_the_run_summary():
    def steps(meter, clock, seconds):
        for second in seconds:
            run_step(meter, clock, batch(1000), seconds=second)

    clock = FakeClock()
    whole = make_meter(clock, peak=FakePeak())
    steps(whole, clock, [1.0, 2.0, 3.0, 4.0])
    whole.metrics()
    steps(whole, clock, [5.0, 6.0])
    expected = whole.summary()

    first = make_meter(FakeClock())
    steps(first, first._timer._clock, [1.0, 2.0, 3.0, 4.0])
    first.metrics()
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds: plain values
    resumed = make_meter(FakeClock())
    resumed.load_state_dict(saved)
    steps(resumed, resumed._timer._clock, [5.0, 6.0])
    assert resumed.summary() == pytest.approx(expected)
    # 6e12 FLOPs in 21 s on a 1e12 FLOP/s GPU.
    assert resumed.summary()["mfu"] == pytest.approx(6 / 21)
    assert resumed.run_flops().model_flops == 6 * 10**12


def test_a_state_of_another_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        make_meter(FakeClock()).load_state_dict({"version": 99})
