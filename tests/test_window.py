"""The window model (``_window.py``): utilization after PaLM's formula, one peak or one per dtype, a
window packed for the reduction and back, and run totals across resumes. Expected values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from mfu_callbacks._window import (
    DTYPE_SLOTS,
    RunTotals,
    Window,
    pack,
    per_gpu_per_second,
    unpack,
    utilization,
)


def test_utilization_is_flops_per_gpu_second_over_the_peak():
    # 6e12 FLOPs over 4 GPUs in 2 s: 7.5e11 FLOP/s per GPU, on a 1e12 FLOP/s peak.
    assert per_gpu_per_second(6e12, 2.0, 4) == pytest.approx(7.5e11)
    assert utilization(6e12, 2.0, 4, 1e12) == pytest.approx(0.75)


def test_with_a_peak_per_dtype_each_dtype_is_judged_against_its_own_peak():
    fp8, run = DTYPE_SLOTS.index("fp8"), DTYPE_SLOTS.index("")
    by_dtype = [0.0] * len(DTYPE_SLOTS)
    by_dtype[fp8], by_dtype[run] = 4e12, 1e12
    # fp8: 4e12 / 2e12 = 2 s at its peak, the rest 1e12 / 1e12 = 1 s: 3 s of peak work in 4 s on 1 GPU.
    assert utilization(5e12, 4.0, 1, {"": 1e12, "fp8": 2e12}, by_dtype) == pytest.approx(0.75)


def test_a_window_packed_for_the_reduction_unpacks_to_itself_on_one_rank():
    local = Window(model_flops=3e12, hardware_flops=4e12, wall_seconds=2.0, steps=2, counting_ranks=1)
    sums, maxima = pack(local)
    back = unpack(local, sums, maxima)
    assert (back.model_flops, back.hardware_flops, back.wall_seconds, back.steps) == (3e12, 4e12, 2.0, 2)
    assert math.isinf(back.step_time_max) == math.isinf(local.step_time_max)


def test_run_totals_resumed_with_another_world_size_weigh_each_window_by_its_gpus():
    # 2 GPUs: 4e12 FLOPs in 2 s (1e12 per GPU-second); then 1 GPU: 1e12 in 1 s (the same rate).
    first = RunTotals()
    first.add(Window(world_size=2, model_flops=4e12, wall_seconds=2.0, steps=2, counting_ranks=2))
    resumed = RunTotals.from_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.add(Window(world_size=1, model_flops=1e12, wall_seconds=1.0, steps=1, counting_ranks=1))
    assert resumed.utilization(resumed.model_flops, 1e12) == pytest.approx(1.0)  # was 1.67 (5e12 / 3 s / 1)
    grown = RunTotals.from_state_dict({k: v for k, v in first.state_dict().items() if k != "gpu_seconds"})
    grown.add(Window(world_size=4, model_flops=8e12, wall_seconds=2.0, steps=2, counting_ranks=4))
    assert grown.utilization(grown.model_flops, 1e12) == pytest.approx(
        1.0
    )  # an older state: gpu_seconds derived


def test_run_totals_keep_flops_by_dtype_across_a_resume_and_an_older_state_puts_them_in_the_runs_dtype():
    fp8, run = DTYPE_SLOTS.index("fp8"), DTYPE_SLOTS.index("")
    by_dtype = tuple(3e12 if i == fp8 else 1e12 if i == run else 0.0 for i in range(len(DTYPE_SLOTS)))
    first = RunTotals()
    first.add(Window(model_flops=4e12, model_by_dtype=by_dtype, wall_seconds=1.0, steps=1, counting_ranks=1))
    peaks = {"": 1e12, "fp8": 2e12}
    resumed = RunTotals.from_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.model_utilization(peaks) == pytest.approx(3 / 2 + 1 / 1)  # seconds at the peaks over 1 s
    older = RunTotals.from_state_dict(
        {k: v for k, v in first.state_dict().items() if not k.endswith("_by_dtype")}
    )
    assert older.model_utilization(peaks) == pytest.approx(4.0)  # all at the run's dtype's peak
    with pytest.raises(ValueError, match="model_by_dtype"):
        RunTotals.from_state_dict({**first.state_dict(), "model_by_dtype": [1.0, -2.0]})
