"""The profiled steps on real training steps (CPU): attributed matmul FLOPs, steps left out, one line when busy."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks import MFUMeter
from mfu_callbacks.attribution import OPTIMIZER
from mfu_callbacks.testing import causal_lm

ROWS = 2


def train(model, meter, length: int, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 100, (ROWS, length), generator=torch.Generator().manual_seed(length))
    for _ in range(steps):
        if meter is not None:
            meter.start_step({"input_ids": ids, "labels": ids})
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if meter is not None:
            meter.end_step()


def step_flops(model, length: int) -> float:
    ids = torch.randint(0, 100, (ROWS, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("length", [16, 48])
def test_profiled_matmuls_are_the_step_flops_by_component(lora, length):
    model = causal_lm(hidden=32, vocab=100, attention="eager", lora_rank=4 if lora else None)
    truth = step_flops(model, length)
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=1, profile_steps=2, real_step="off")
    train(model, meter, length, steps=6)
    meter.metrics()  # the measured steps' mean step time is known after a read
    result = meter.step_breakdown()
    assert result is not None and result.steps == 2
    matmuls = result.matmul_buckets()
    # Eager attention: every FLOP of the step is a matmul the profile saw, per step.
    assert sum(b.flops for b in matmuls.values()) == pytest.approx(truth, rel=1e-9)
    expected = {"attention_projections", "attention_scores", "mlp", "head"} | (
        {"adapters"} if lora else set()
    )
    assert set(matmuls) == expected
    for name, bucket in matmuls.items():  # padding-free rows: computed FLOPs are the model's
        assert bucket.flops == pytest.approx(bucket.model_flops, rel=1e-9), name
    assert OPTIMIZER in {b.name for b in result.buckets}
    assert result.total_seconds == pytest.approx(result.step_seconds, rel=1e-9)
    assert result.measured_step_seconds is not None and result.busy_seconds > 0
    # Calibrated to the measured step: its kernels as profiled, the rest idle.
    assert result.step_seconds == pytest.approx(max(result.measured_step_seconds, result.busy_seconds))


def test_profiled_steps_are_left_out_of_the_averages():
    def measured_steps(profile_steps: int) -> float:
        model = causal_lm(hidden=32, vocab=100)
        meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=1, profile_steps=profile_steps)
        train(model, meter, 16, steps=7)
        assert meter.metrics()["mfu"] > 0
        return meter._reader.run.steps

    assert measured_steps(0) - measured_steps(3) == 3


def test_a_run_ending_inside_the_window_is_analysed_at_its_end():
    model = causal_lm(hidden=32, vocab=100)
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, profile_steps=10, profile_start=2)
    train(model, meter, 16, steps=5)
    result = meter.step_breakdown()
    assert result is not None and result.steps == 3


def test_another_profiler_running_costs_the_breakdown_only(caplog):
    model = causal_lm(hidden=32, vocab=100)
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=1, profile_steps=2)
    with (
        caplog.at_level(logging.WARNING, logger="mfu_callbacks"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
    ):
        train(model, meter, 16, steps=6)
    assert meter.step_breakdown() is None
    assert "another profiler is already running" in (meter.profile_note or "")
    assert sum("no step-time breakdown" in r.message for r in caplog.records) == 1
    assert meter.metrics()["mfu"] > 0


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_bad_profile_options_are_refused(value):
    with pytest.raises(ValueError, match="profile_steps"):
        MFUMeter(causal_lm(), peak_tflops=1.0, profile_steps=value)
    with pytest.raises(ValueError, match="profile_start"):
        MFUMeter(causal_lm(), peak_tflops=1.0, profile_steps=1, profile_start=value)


def test_the_alignment_checks_wait_for_the_window_and_read_its_matmul_times(monkeypatch):
    from mfu_callbacks.diagnostics import Diagnostics

    seen: list[dict] = []
    review = Diagnostics.review

    def spy(self, run, **kwargs):
        seen.append(kwargs)
        return review(self, run, **kwargs)

    monkeypatch.setattr(Diagnostics, "review", spy)
    model = causal_lm(hidden=32, vocab=1001)  # a vocabulary off every alignment
    meter = MFUMeter(model, peak_tflops=1.0, dtype="bf16", warmup_steps=1, profile_steps=2, profile_start=4)
    train(model, meter, 16, steps=3)
    meter.metrics()  # before the window: the vocabulary is not judged yet
    assert seen[-1]["profile_pending"] and seen[-1]["measured_matmuls"] is None
    assert "vocab_alignment" not in {d.id for d in meter.diagnostics()}
    train(model, meter, 16, steps=5)
    meter.metrics()
    measured = seen[-1]["measured_matmuls"]
    assert not seen[-1]["profile_pending"]
    breakdown = meter.step_breakdown()
    assert breakdown is not None
    assert {name: (t.seconds, t.flops) for name, t in measured.items()} == {
        name: (b.seconds, b.flops) for name, b in breakdown.matmul_buckets().items()
    }
