"""The meter's metrics against a fake clock and a fake FLOP engine of known FLOPs, and once with the real engine.

Expected values are worked out by hand in each test from the FLOPs per token, the seconds and the
peak below, never with the meter's own helpers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mfu_callbacks.meter as meter_module
from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.timer import StepTimer
from tests.helpers.fakes import PEAK_FLOPS, FakeClock, FakeEngine, FakePeak, batch, make_meter, run_step


def test_every_metric_of_a_window():
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, batch(100, padded=128), seconds=0.5)
    run_step(meter, clock, batch(300, padded=384), seconds=1.0, wait=0.25)
    metrics = meter.metrics()
    # 400 real tokens x 1e9 = 4e11 FLOPs in 1.75 s (two steps and the 0.25 s input wait) on one
    # GPU of 1e12 FLOP/s.
    assert metrics["mfu"] == pytest.approx(4e11 / 1.75 / 1e12)
    # 512 computed tokens x 1.5e9 = 7.68e11 FLOPs.
    assert metrics["hfu"] == pytest.approx(7.68e11 / 1.75 / 1e12)
    assert metrics["tflops_per_gpu"] == pytest.approx(4e11 / 1.75 / 1e12)
    assert metrics["tokens_per_sec"] == pytest.approx(400 / 1.75)
    assert metrics["tokens_per_sec_per_gpu"] == pytest.approx(400 / 1.75)
    assert metrics["step_time"] == pytest.approx(0.875)
    assert metrics["padding_fraction"] == pytest.approx(112 / 512)
    assert metrics["input_wait_fraction"] == pytest.approx(0.25 / 1.75)
    # The last step alone: 3e11 FLOPs (5.76e11 computed) in 1 s after a 0.25 s wait.
    assert metrics["mfu_last_step"] == pytest.approx(0.3 / 1.25)
    assert metrics["hfu_last_step"] == pytest.approx(0.576 / 1.25)
    assert set(metrics) == {
        "mfu",
        "hfu",
        "tflops_per_gpu",
        "tokens_per_sec",
        "tokens_per_sec_per_gpu",
        "step_time",
        "padding_fraction",
        "input_wait_fraction",
        "mfu_last_step",
        "hfu_last_step",
    }
    assert all(type(value) is float for value in metrics.values())


def test_the_window_average_weights_by_flops_not_by_step():
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, batch(1000), seconds=1.0)  # MFU 1.0 alone
    run_step(meter, clock, batch(1000), seconds=9.0)  # MFU 0.111 alone
    # 2e12 FLOPs over 10 s: 0.2, where a mean of the two ratios would say 0.556.
    assert meter.metrics()["mfu"] == pytest.approx(0.2)


def test_nothing_to_report_before_a_step_finished_and_after_a_read():
    clock = FakeClock()
    meter = make_meter(clock)
    assert meter.metrics() == {}
    meter.start_step(batch(10))
    assert meter.metrics() == {}
    clock.advance(1.0)
    meter.end_step()
    assert meter.metrics() != {}
    assert meter.metrics() == {}


def test_warmup_steps_are_left_out_and_not_even_counted():
    clock = FakeClock()
    engine = FakeEngine()
    meter = make_meter(clock, warmup_steps=2, engine=engine)
    run_step(meter, clock, batch(5000), seconds=30.0)
    run_step(meter, clock, batch(5000), seconds=20.0)
    assert meter.metrics() == {}
    run_step(meter, clock, batch(200), seconds=2.0, wait=0.5)
    metrics = meter.metrics()
    assert metrics["tokens_per_sec"] == pytest.approx(200 / 2.5)
    assert metrics["mfu"] == pytest.approx(2e11 / 2.5 / 1e12)
    assert metrics["input_wait_fraction"] == pytest.approx(0.5 / 2.5)
    assert engine.counted == 1


def test_gradient_accumulation_sums_the_micro_batches_of_a_step():
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, batch(100), batch(200, padded=256), batch(300), seconds=2.0)
    metrics = meter.metrics()
    assert metrics["tflops_per_gpu"] == pytest.approx(600e9 / 2.0 / 1e12)
    assert metrics["tokens_per_sec"] == pytest.approx(300.0)
    assert metrics["padding_fraction"] == pytest.approx(56 / 656)
    assert metrics["step_time"] == pytest.approx(2.0)


def test_input_wait_is_the_gap_between_steps():
    clock = FakeClock()
    meter = make_meter(clock, warmup_steps=1)
    for _ in range(4):
        run_step(meter, clock, batch(10), seconds=3.0, wait=1.0)
    assert meter.metrics()["input_wait_fraction"] == pytest.approx(3 * 1.0 / (3 * 1.0 + 3 * 3.0))


def test_the_meters_own_log_time_work_is_counted_in_the_wall_clock_but_not_as_input_wait(monkeypatch):
    clock = FakeClock()
    meter = make_meter(clock)
    evaluate = FakeEngine.evaluate

    slow = [60.0]

    def slow_evaluate(self, features):
        clock.advance(slow.pop() if slow else 0.0)  # as if one read had spent a minute
        return evaluate(self, features)

    run_step(meter, clock, batch(10), seconds=1.0)
    monkeypatch.setattr(FakeEngine, "evaluate", slow_evaluate)
    meter.metrics()
    run_step(meter, clock, batch(10), seconds=1.0, wait=0.5)
    metrics = meter.metrics()
    assert metrics["step_time"] == pytest.approx(61.5)  # the step, the input wait and the read before it
    assert metrics["input_wait_fraction"] == pytest.approx(0.5 / 61.5)


def test_without_a_peak_mfu_is_left_out_and_the_rest_stays(monkeypatch):
    monkeypatch.delenv("MFU_PEAK_TFLOPS", raising=False)
    clock = FakeClock()
    meter = make_meter(clock, peak=None)  # the table knows no peak for a CPU
    assert meter.peak is None
    run_step(meter, clock, batch(500), seconds=2.0)
    metrics = meter.metrics()
    assert not {"mfu", "hfu", "mfu_last_step", "hfu_last_step"} & set(metrics)
    assert metrics["tflops_per_gpu"] == pytest.approx(5e11 / 2.0 / 1e12)
    assert metrics["tokens_per_sec"] == pytest.approx(250.0)
    assert meter.summary() == {
        "tflops_per_gpu": pytest.approx(0.25),
        "tokens_per_sec_per_gpu": pytest.approx(250.0),
    }


def test_the_peak_comes_from_the_override_at_the_given_dtype():
    meter = MFUMeter(nn.Linear(2, 2), peak_tflops=312.0, dtype="bf16", engine=FakeEngine())
    assert meter.peak.flops == 312e12
    assert meter.peak.dtype == "bf16"


def test_a_step_open_during_a_read_keeps_its_micro_batches():
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, batch(100), seconds=1.0)
    meter.start_step(batch(40))
    assert meter.metrics()["tokens_per_sec"] == pytest.approx(100.0)
    meter.add_batch(batch(60))
    clock.advance(2.0)
    meter.end_step()
    assert meter.metrics()["tokens_per_sec"] == pytest.approx(100 / 2.0)


def test_many_steps_between_reads_are_all_counted():
    clock = FakeClock()
    meter = make_meter(clock)
    for index in range(300):  # more steps than the count buffer starts with
        run_step(meter, clock, batch(index + 1), seconds=0.5)
    metrics = meter.metrics()
    assert metrics["tokens_per_sec"] == pytest.approx(sum(range(1, 301)) / 150.0)
    assert metrics["mfu_last_step"] == pytest.approx(300e9 / 0.5 / 1e12)


def test_steps_without_batches_have_a_time_but_no_flops():
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, seconds=1.0)
    assert meter.metrics() == {"step_time": 1.0, "input_wait_fraction": 0.0}


def test_summary_covers_the_whole_run_after_warmup_including_unread_steps():
    clock = FakeClock()
    meter = make_meter(clock, warmup_steps=1)
    run_step(meter, clock, batch(9999), seconds=100.0)
    run_step(meter, clock, batch(100), seconds=1.0)
    meter.metrics()
    run_step(meter, clock, batch(500), seconds=2.0)
    summary = meter.summary()
    assert summary["mfu"] == pytest.approx(6e11 / 3.0 / 1e12)
    assert summary["hfu"] == pytest.approx(9e11 / 3.0 / 1e12)
    assert summary["tflops_per_gpu"] == pytest.approx(0.2)
    assert summary["tokens_per_sec_per_gpu"] == pytest.approx(200.0)
    assert meter.metrics() == {}, "summary() read the pending step"


def test_a_world_size_without_a_process_group_takes_the_other_ranks_to_match():
    clock = FakeClock()
    meter = make_meter(clock, world_size=4)
    run_step(meter, clock, batch(100), seconds=1.0)
    metrics = meter.metrics()
    assert metrics["tokens_per_sec"] == pytest.approx(400.0)
    assert metrics["tokens_per_sec_per_gpu"] == pytest.approx(100.0)
    assert metrics["mfu"] == pytest.approx(1e11 / 1.0 / 1e12)


def test_the_engine_is_built_at_the_first_batch_and_that_step_is_not_timed(monkeypatch):
    built = []
    engine = FakeEngine()

    def from_model(model, first_batch, *, forward=None, token_counter=None):
        built.append((model, first_batch, forward, token_counter))
        return engine

    monkeypatch.setattr(meter_module.FlopEngine, "from_model", staticmethod(from_model))
    clock = FakeClock()
    forward, counter = (lambda model, batch: model(batch)), (lambda batch: batch)  # passed through as given
    model = nn.Linear(2, 2)
    meter = MFUMeter(
        model,
        peak=FakePeak(),
        warmup_steps=0,
        forward=forward,
        token_counter=counter,
        timer=StepTimer(0, clock=clock, force_cpu=True),
    )
    assert built == []
    run_step(meter, clock, seconds=1.0)
    first = batch(100)
    run_step(meter, clock, first, seconds=50.0)  # builds the engine: left out
    run_step(meter, clock, batch(100), seconds=1.0)
    assert built == [(model, first, forward, counter)]
    assert meter.metrics()["step_time"] == pytest.approx(1.0)


def test_the_hot_path_never_reads_a_tensor_back_to_the_host(monkeypatch):
    clock = FakeClock()
    meter = make_meter(clock)
    run_step(meter, clock, batch(10), seconds=1.0)
    meter.metrics()

    def forbidden(*args, **kwargs):
        raise AssertionError("host read-back on the hot path")

    with monkeypatch.context() as patch:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, forbidden)
        for _ in range(3):
            run_step(meter, clock, batch(10), batch(20), seconds=1.0)
    assert meter.metrics()["tokens_per_sec"] == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("misuse", "error", "message"),
    [
        (lambda meter: meter.end_step(), ValueError, "end_step\\(\\) called without start_step\\(\\)"),
        (lambda meter: meter.add_batch(batch(1)), ValueError, "add_batch\\(\\) called outside a step"),
        (lambda meter: (meter.start_step(), meter.start_step()), ValueError, "call end_step\\(\\)"),
        (lambda meter: (meter.start_step(), meter.add_batch(None)), TypeError, "needs the micro-batch"),
    ],
    ids=["end-without-start", "add-without-start", "start-twice", "add-none"],
)
def test_misuse_raises_an_error_that_names_the_fix(misuse, error, message):
    meter = make_meter(FakeClock())
    with pytest.raises(error, match=message):
        misuse(meter)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"peak_tflops": -5.0}, "peak_tflops"),
        ({"world_size": 0}, "world_size"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MFUMeter(nn.Linear(2, 2), engine=FakeEngine(), peak=FakePeak(), **options)


def test_with_the_real_flop_engine_on_a_tiny_llama():
    from tests.conftest import FixedLengthTokens, collate, step_truth, tiny_llama

    model = tiny_llama()
    full = collate([FixedLengthTokens(4)[i] for i in range(4)])  # 4 rows x 16 tokens
    padded = {key: value.clone() for key, value in full.items()}
    padded["attention_mask"][:, 12:] = 0  # the last 4 tokens of every row are padding
    padded["labels"][:, 12:] = -100
    clock = FakeClock()
    meter = MFUMeter(model, peak=FakePeak(), timer=StepTimer(1, clock=clock, force_cpu=True))
    run_step(meter, clock, full, seconds=1.0)  # warm-up: builds the engine
    run_step(meter, clock, full, full, seconds=2.0)  # two micro-batches
    metrics = meter.metrics()
    expected = 2 * step_truth(model, full)
    assert metrics["mfu"] == pytest.approx(expected / 2.0 / PEAK_FLOPS, rel=1e-9)
    assert metrics["tokens_per_sec"] == pytest.approx(2 * 64 / 2.0)
    assert metrics["padding_fraction"] == 0.0
    run_step(meter, clock, padded, seconds=1.0)
    metrics = meter.metrics()
    assert metrics["tokens_per_sec"] == pytest.approx(48.0)
    assert metrics["padding_fraction"] == pytest.approx(0.25)
    assert metrics["hfu"] == pytest.approx(step_truth(model, full) / PEAK_FLOPS, rel=1e-9)
    assert metrics["mfu"] < metrics["hfu"]
    # The engine settled at the first read: its head computes every position, so batches no longer
    # take which positions have a label (one operation less per micro-batch), and count the same.
    assert meter.engine is not None and not meter.engine.reads_labelled
    assert [tuple(taken.shape) for taken in meter.engine.defer(padded)[1]] == [(4,)]
    run_step(meter, clock, padded, seconds=1.0)
    assert meter.metrics()["mfu"] == pytest.approx(metrics["mfu"], rel=1e-12)


def test_the_peak_follows_the_autocast_dtype_seen_at_the_first_forward():
    """A plain loop builds the meter outside autocast; the matmuls run in bf16, so must the peak."""
    model = nn.Linear(8, 8)
    meter = MFUMeter(model, peak_tflops=100.0, warmup_steps=0)
    assert meter.peak.dtype == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.ones(2, 8))
    assert meter.peak.dtype == "bf16"
    assert meter.peak.flops == 100e12
    assert not model._forward_pre_hooks, "the look is taken once, then the hook is gone"


def test_a_read_at_every_step_reviews_the_diagnoses_a_few_times_per_run(monkeypatch):
    """A log at every 0.1 s step for 5 minutes: the diagnoses (which walk the model's layers) are
    reviewed at the first read, then at least ten measured seconds apart and once the steps grew by a
    tenth: a few dozen reviews in 3,000 reads, fewer late in the run than early."""
    reviews: list[float] = []
    review = meter_module.Diagnostics.review

    def counted(self, run, **kwargs):
        reviews.append(run.wall_seconds)
        return review(self, run, **kwargs)

    monkeypatch.setattr(meter_module.Diagnostics, "review", counted)
    clock = FakeClock()
    meter = make_meter(clock)
    for _ in range(3000):
        run_step(meter, clock, batch(100), seconds=0.1)
        meter.metrics()
    assert reviews[0] == pytest.approx(0.1), "the first read reviews the run"
    gaps = [later - earlier for earlier, later in zip(reviews, reviews[1:])]
    assert min(gaps) >= 10.0 - 1e-9
    assert len(reviews) <= 25  # 300 s: every 10 s up to 100 s, then every tenth (log 3 / log 1.1)
    assert sum(1 for seconds in reviews if seconds > 200) < sum(1 for seconds in reviews if seconds <= 100)
