"""The step-time breakdown from a timeline of kernels: every instant to one bucket, and the advice."""

from __future__ import annotations

import json

import pytest

from mfu_callbacks import attribution
from mfu_callbacks.attribution import (
    ATTENTION,
    COMMUNICATION,
    ELEMENTWISE,
    HOST_GAPS,
    INPUT_WAIT,
    MATMUL,
    OPTIMIZER,
    Kernel,
    breakdown,
    format_breakdown,
    write_breakdown,
)

MS = 1e-3


def matmul(start: float, end: float, component: str, tflops: float, dims=(4096, 4096, 4096)) -> Kernel:
    seconds = (end - start) * MS
    return Kernel(start * MS, end * MS, MATMUL, component, tflops * 1e12 * seconds, dims)


def test_buckets_cover_the_span_once_with_idle_time_split_by_what_the_host_did():
    kernels = [
        matmul(1, 4, "mlp", 500),
        Kernel(4 * MS, 5 * MS, ELEMENTWISE),
        Kernel(6 * MS, 7 * MS, OPTIMIZER),
    ]
    # 0-1 and 5-6 idle inside the step; 7-10 idle while the host is between steps.
    result = breakdown(kernels, (0.0, 10 * MS), steps=1, between_steps=[(7 * MS, 10 * MS)])
    seconds = {b.name: b.seconds for b in result.buckets}
    assert seconds == pytest.approx(
        {"matmul: mlp": 3 * MS, ELEMENTWISE: 1 * MS, OPTIMIZER: 1 * MS, HOST_GAPS: 2 * MS, INPUT_WAIT: 3 * MS}
    )
    assert result.total_seconds == pytest.approx(result.step_seconds) == pytest.approx(10 * MS)


def test_overlapping_kernels_share_the_instant_and_communication_under_compute_is_overlapped():
    kernels = [
        matmul(0, 4, "mlp", 400),
        Kernel(2 * MS, 4 * MS, ELEMENTWISE),  # a second stream: 2-4 shared by two kernels
        Kernel(3 * MS, 6 * MS, "communication"),  # 3-4 under compute, 4-6 exposed
    ]
    result = breakdown(kernels, (0.0, 6 * MS), steps=2)
    seconds = {b.name: b.seconds for b in result.buckets}
    # Per step (two steps in the span): halve everything.
    assert seconds["matmul: mlp"] == pytest.approx((2 + 1) * MS / 2)
    assert seconds[ELEMENTWISE] == pytest.approx(1 * MS / 2)
    assert seconds[COMMUNICATION] == pytest.approx(2 * MS / 2)
    assert result.overlapped_communication == pytest.approx(1 * MS / 2)
    assert result.total_seconds == pytest.approx(3 * MS)


def test_kernels_outside_the_span_are_clipped():
    kernels = [matmul(-2, 2, "mlp", 100), Kernel(9 * MS, 12 * MS, ELEMENTWISE)]
    result = breakdown(kernels, (0.0, 10 * MS), steps=1)
    seconds = {b.name: b.seconds for b in result.buckets}
    assert seconds["matmul: mlp"] == pytest.approx(2 * MS)
    assert seconds[ELEMENTWISE] == pytest.approx(1 * MS)
    assert result.total_seconds == pytest.approx(10 * MS)


def test_a_slow_misaligned_head_is_the_top_advice_with_its_padding():
    # mlp runs at 600 TFLOP/s; the head, with a vocabulary of 32001, at a fifth of that.
    kernels = [
        matmul(0, 60, "mlp", 600),
        matmul(60, 85, "head", 120, dims=(8192, 32001, 4096)),
        Kernel(85 * MS, 90 * MS, OPTIMIZER),
        Kernel(90 * MS, 92 * MS, ELEMENTWISE),
    ]
    model_flops = {"mlp": 600e12 * 60 * MS, "head": 120e12 * 25 * MS}
    result = breakdown(kernels, (0.0, 100 * MS), steps=1, model_flops=model_flops, peak_flops=989e12)
    assert result.best_matmul_tflops == pytest.approx(600)
    top = result.advice[0]
    assert top.bucket == "matmul: head"
    assert "32,001" in top.change and "multiples of 8" in top.change  # bf16's tile, the default
    # At 600 TFLOP/s the head takes 5 ms instead of 25: the step 80 ms instead of 100.
    assert top.mfu_if_fixed == pytest.approx(sum(model_flops.values()) / (80 * MS * 989e12))
    assert not top.upper_bound
    # Idle time (8 ms here) can vanish: ranked with the measured estimates, by gain.
    idle = next(a for a in result.advice if a.bucket == HOST_GAPS)
    assert not idle.upper_bound
    assert idle.mfu_if_fixed == pytest.approx(sum(model_flops.values()) / (92 * MS * 989e12))
    assert [a.bucket for a in result.advice[:2]] == ["matmul: head", HOST_GAPS]


def test_upper_bounds_of_busy_work_rank_after_the_measured_estimates_even_when_larger():
    # Elementwise kernels taking 40 ms would gain more if they vanished than the slow head at the best
    # rate, but nothing measured says they can: they come after.
    kernels = [
        matmul(0, 40, "mlp", 600),
        matmul(40, 50, "head", 120, dims=(8192, 32001, 4096)),
        Kernel(50 * MS, 90 * MS, ELEMENTWISE),
    ]
    model_flops = {"mlp": 600e12 * 40 * MS, "head": 120e12 * 10 * MS}
    result = breakdown(kernels, (0.0, 90 * MS), steps=1, model_flops=model_flops, peak_flops=989e12)
    assert [a.bucket for a in result.advice] == ["matmul: head", ELEMENTWISE]
    assert result.advice[1].upper_bound and result.advice[1].mfu_gain > result.advice[0].mfu_gain


def test_calibration_keeps_the_kernels_and_gives_the_idle_time_the_measured_step_leaves():
    kernels = [matmul(0, 60, "mlp", 500), Kernel(60 * MS, 70 * MS, OPTIMIZER)]
    # Profiled: 100 ms per step, 30 of them idle (20 waiting for the host, 10 between steps).
    profiled = breakdown(
        kernels,
        (0.0, 100 * MS),
        steps=1,
        between_steps=[(90 * MS, 100 * MS)],
        model_flops={"mlp": 500e12 * 60 * MS},
        peak_flops=1e15,
    )
    result = attribution.calibrated(profiled, 76 * MS)  # without the profiler the step took 76 ms
    seconds = {b.name: b.seconds for b in result.buckets}
    assert seconds["matmul: mlp"] == pytest.approx(60 * MS) and seconds[OPTIMIZER] == pytest.approx(10 * MS)
    assert seconds[HOST_GAPS] == pytest.approx(4 * MS) and seconds[INPUT_WAIT] == pytest.approx(2 * MS)
    assert result.total_seconds == pytest.approx(76 * MS) == pytest.approx(result.step_seconds)
    assert result.profiled_step_seconds == pytest.approx(100 * MS)
    assert result.mfu == pytest.approx(500e12 * 60 * MS / (76 * MS * 1e15))
    assert "idled 24.00 ms more" in result.notes[0]


def test_kernels_longer_than_the_measured_step_keep_their_time_and_say_so():
    profiled = breakdown([matmul(0, 50, "mlp", 500)], (0.0, 60 * MS), steps=1)
    result = attribution.calibrated(profiled, 40 * MS)
    assert result.step_seconds == pytest.approx(50 * MS)
    assert {b.name for b in result.buckets} == {"matmul: mlp"}
    assert "25.0% more than the measured step" in result.notes[0]


def test_attention_kernels_are_judged_at_the_best_matmul_rate_with_the_model_attention_flops():
    kernels = [matmul(0, 10, "mlp", 500), Kernel(10 * MS, 20 * MS, ATTENTION)]
    model_flops = {"mlp": 500e12 * 10 * MS, "attention_scores": 500e12 * 2 * MS}
    result = breakdown(kernels, (0.0, 20 * MS), steps=1, model_flops=model_flops, peak_flops=1e15)
    advice = next(a for a in result.advice if a.bucket == ATTENTION)
    assert advice.mfu_if_fixed == pytest.approx(sum(model_flops.values()) / (12 * MS * 1e15))
    assert not advice.upper_bound


def test_a_tiny_fast_matmul_does_not_set_the_best_rate():
    kernels = [matmul(0, 50, "mlp", 400), matmul(50, 50.1, "router", 900)]
    result = breakdown(kernels, (0.0, 51 * MS), steps=1)
    assert result.best_matmul_tflops == pytest.approx(400)


def test_without_model_flops_or_peak_there_is_a_breakdown_but_no_advice():
    result = breakdown([matmul(0, 5, "mlp", 100)], (0.0, 10 * MS), steps=1)
    assert result.mfu is None and result.advice == ()
    assert "Where the step time goes" in format_breakdown(result)


def test_the_breakdown_is_written_as_json_and_printed(tmp_path):
    kernels = [matmul(0, 8, "mlp", 500), Kernel(8 * MS, 9 * MS, OPTIMIZER)]
    result = breakdown(
        kernels, (0.0, 10 * MS), steps=1, model_flops={"mlp": 500e12 * 8 * MS}, peak_flops=1e15
    )
    path = write_breakdown(result, tmp_path / "out")
    document = json.loads(path.read_text())
    assert path.name == attribution.FILE_NAME
    assert document["sum_of_buckets_seconds"] == pytest.approx(10 * MS)
    assert [b["name"] for b in document["buckets"]][0] == "matmul: mlp"
    assert document["advice"][0]["bucket"] == HOST_GAPS  # 1 ms idle can vanish; the optimizer is a bound
    text = format_breakdown(result)
    assert "matmul: mlp" in text and "What would raise MFU most" in text


def test_no_profiled_step_is_refused():
    with pytest.raises(ValueError, match="at least one profiled step"):
        breakdown([], (0.0, 1.0), steps=0)
