"""Each diagnosis triggered by its condition on a tiny model on CPU, and silent on a clean run.

Steps are timed by a fake clock and NVML is a fake module; expected numbers are worked out from
torch's FlopCounterMode (the truth of ``conftest``) and the seconds each test chose, never with the
diagnostics' own helpers.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

import mfu_callbacks.diagnostics.checks as diagnostics_module
import mfu_callbacks.diagnostics.checks.precision as precision_checks
from mfu_callbacks import _run_review, distributed
from mfu_callbacks._window import RunTotals
from mfu_callbacks.diagnostics import DIAGNOSIS_IDS, Diagnosis, Diagnostics, clocks, slowdowns, validate_ids
from mfu_callbacks.diagnostics.clocks import ClockLog
from mfu_callbacks.diagnostics.measured import MatmulTime, measured_slowdown
from mfu_callbacks.diagnostics.model_shapes import Linear, ModelShapes
from mfu_callbacks.diagnostics.review import FlopSplit, Review
from mfu_callbacks.diagnostics.slowdowns import (
    MULTIPLE_OF_8_NOT_64,
    NOT_MULTIPLE_OF_8,
    OUT_FEATURES,
    Slowdown,
)
from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.timer import StepTimer
from tests.conftest import (
    VOCAB,
    checkpointing_off,
    full_batch,
    make_eager,
    model_truth,
    padded_batch,
    step_truth,
)
from tests.helpers.fakes import FakeClock, FakePeak

PEAK_FLOPS = 1e9  # a slow fake GPU, so that the tiny model's MFU is a readable fraction
HIDDEN, LAYERS = 64, 2


def llama(vocab: int = VOCAB, intermediate: int = 128, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=intermediate,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def make_meter(
    model: nn.Module,
    clock: FakeClock,
    template: Any,
    *,
    dtype: str = "bf16",
    peak: FakePeak | None = None,
    **kwargs: Any,
) -> MFUMeter:
    """A meter on a fake clock with the engine built up front (no warm-up step needed)."""
    timer = StepTimer(0, clock=clock, force_cpu=True)
    engine = FlopEngine.from_model(model, template)
    peak = peak if peak is not None else FakePeak(flops=PEAK_FLOPS, dtype=dtype)
    return MFUMeter(model, engine=engine, timer=timer, peak=peak, **kwargs)


def run_steps(
    meter: MFUMeter, clock: FakeClock, batch: Any, steps: int, *, seconds: float = 1.0, wait: float = 0.0
) -> None:
    for _ in range(steps):
        clock.advance(wait)
        meter.start_step(batch)
        clock.advance(seconds)
        meter.end_step()


def fired(meter: MFUMeter, diagnosis_id: str) -> Diagnosis | None:
    matches = [diagnosis for diagnosis in meter.diagnostics() if diagnosis.id == diagnosis_id]
    assert len(matches) <= 1, f"{diagnosis_id} fired {len(matches)} times"
    return matches[0] if matches else None


def ids(meter: MFUMeter) -> list[str]:
    return [diagnosis.id for diagnosis in meter.diagnostics()]


@pytest.fixture(scope="module")
def clean_model() -> nn.Module:
    """Vocabulary 128, hidden 64, intermediate 128: every size aligned for bf16 and fp8."""
    return make_eager(llama())


# -- a clean run ---------------------------------------------------------------------------------
def test_a_clean_run_fires_nothing(clean_model, monkeypatch):
    fake_nvml = FakeNvml([1900, 1950, 1880])
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(clocks, "SAMPLE_SECONDS", 0.0)  # every read samples
    monkeypatch.setattr(_run_review, "_REVIEW_SECONDS", 0.0)  # ... and reviews
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch, device="cuda:0")  # NVML is asked about "cuda:0"
    for _ in range(3):
        run_steps(meter, clock, batch, 6, seconds=1.0, wait=0.02)  # 2% input wait
        assert meter.metrics()
    assert meter.summary()
    assert fake_nvml.clock_reads == 3
    assert meter.diagnostics() == []


def test_checks_run_at_read_time_only(clean_model, monkeypatch):
    reviews = []
    review = Diagnostics.review
    monkeypatch.setattr(
        Diagnostics, "review", lambda self, *a, **k: reviews.append(1) or review(self, *a, **k)
    )
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch)
    run_steps(meter, clock, batch, 5)
    assert reviews == []
    meter.metrics()
    assert reviews == [1]


# -- vocabulary ----------------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"  # as torch names an H100 SXM


def hopper_row(shape_class: str, slowdown: float, tflops: float | None, role: str = OUT_FEATURES) -> Slowdown:
    """A measurement made up for a test: Hopper, bf16, a 64-wide layer."""
    return Slowdown(
        family="hopper", dtype="bf16", shape_class=shape_class, role=role, slowdown=slowdown, tflops=tflops,
        aligned_tflops=None, gpu="H100 SXM", other_size=64, tokens=32, sizes=(1001,),
        source="test sweep", date="2026-11-25",
    )  # fmt: skip


def vocab_run(
    vocab: int, *, device_name: str, seconds: float = 1.0, **kwargs: Any
) -> tuple[MFUMeter, nn.Module]:
    model = make_eager(llama(vocab=vocab))
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(
        model, clock, batch, peak=FakePeak(flops=PEAK_FLOPS, device_name=device_name), **kwargs
    )
    run_steps(meter, clock, batch, 2, seconds=seconds)
    meter.metrics()
    return meter, model


def test_an_unaligned_vocabulary_without_a_measurement_claims_no_cost():
    meter, model = vocab_run(1001, device_name="Fake GPU")
    diagnosis = fired(meter, "vocab_alignment")
    assert diagnosis is not None and diagnosis.mfu_cost is None
    head_flops = 6 * 32 * HIDDEN * 1001  # forward, input and weight gradient of the 64 x 1001 head
    assert diagnosis.flops_share == pytest.approx(
        head_flops / model_truth(model, full_batch(2, 16)), rel=1e-9
    )
    assert diagnosis.value == 1001 and diagnosis.details["padded_vocab_size"] == 1024
    assert "no cost is claimed" in diagnosis.message and "pad_to_multiple_of=64" in diagnosis.message
    assert "x slower" not in diagnosis.message
    assert "matmul_alignment" not in ids(meter)  # the head's vocabulary dimension is this diagnosis's alone


def test_a_multiple_of_8_is_not_reported_without_a_measurement():
    meter, _ = vocab_run(1000, device_name="Fake GPU")
    assert "vocab_alignment" not in ids(meter)


def test_the_measured_table_gives_the_heads_cost_on_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(
        slowdowns,
        "MEASURED",
        (hopper_row(NOT_MULTIPLE_OF_8, 4.0, tflops=1e-5), hopper_row(MULTIPLE_OF_8_NOT_64, 1.0, tflops=1e-5)),
    )
    meter, model = vocab_run(1001, device_name=H100, seconds=10.0)
    diagnosis = fired(meter, "vocab_alignment")
    # Two steps of 10 s; the head ran its 2 x 6 x 32 x 64 x 1001 FLOPs at the table's 10 MFLOP/s, and
    # aligned it would have taken a quarter of that time.
    head_seconds = 2 * 6 * 32 * HIDDEN * 1001 / 1e7
    saved = head_seconds * (1 - 1 / 4.0)
    mfu = meter.summary()["mfu"]
    flops = 2 * model_truth(model, full_batch(2, 16))
    assert mfu == pytest.approx(flops / 20.0 / PEAK_FLOPS)
    assert diagnosis.details["time_share"] == pytest.approx(saved / 20.0, rel=1e-9)
    assert diagnosis.mfu_cost == pytest.approx(flops / (20.0 - saved) / PEAK_FLOPS - mfu, rel=1e-9)
    assert diagnosis.details["slowdown"] == 4.0 and diagnosis.details["measured_in_run"] == 0.0
    # The table shows multiples of 8 cost nothing on this GPU: 8 is enough.
    assert diagnosis.details["padded_vocab_size"] == 1008
    assert "4.0x slower" in diagnosis.message and "test sweep" in diagnosis.message
    assert "pad_to_multiple_of=8" in diagnosis.message
    meter, _ = vocab_run(1000, device_name=H100)
    assert "vocab_alignment" not in ids(meter), "measured: a multiple of 8 costs nothing here"
    meter, _ = vocab_run(1001, device_name="NVIDIA A100-SXM4-80GB")
    assert fired(meter, "vocab_alignment").mfu_cost is None, "a Hopper measurement says nothing of an A100"


def test_the_shipped_table_holds_the_h100_measurements():
    row = slowdowns.find(H100, "bf16", 32001, OUT_FEATURES, other_size=2048)
    assert row is not None and row.slowdown > 5 and row.tflops is not None
    assert "bench_vocab_sweep.py" in row.source and row.date
    assert slowdowns.find(H100, "bf16", 32008, OUT_FEATURES).slowdown == 1.0
    assert slowdowns.find(H100, "fp16", 32001, OUT_FEATURES) is None, "nothing measured at fp16"
    assert slowdowns.find("NVIDIA H200", "bf16", 32001, OUT_FEATURES) is row, "the same Hopper chip"
    assert slowdowns.find(H100, "bf16", 32000, OUT_FEATURES) is None, (
        "a multiple of 64 has nothing to measure"
    )
    assert Slowdown.from_dict(row.to_dict()) == row


def test_the_shipped_table_predicts_the_measured_cost_of_a_32001_vocabulary():
    """A whole-step measurement on an H100 with HF Trainer, its figures quoted here: a 0.7B
    Llama-style model (hidden 2048, 4 x 2048 tokens, bf16) took 128.2 ms per step at MFU 27.4% with
    vocabulary 32001, and 108.0 ms at 32.5% with 32000. The check, given only the 32001 run, must
    claim about that difference, from the table measured on the head alone."""
    tokens, hidden, vocab, step = 4 * 2048, 2048, 32001, 0.1282
    peak = 989.4e12
    model_flops = 0.274 * peak * step  # per step, from the measured MFU
    head_flops = 6 * tokens * hidden * vocab  # forward, input and weight gradient of the head
    run = RunTotals(model_flops=model_flops, wall_seconds=step, step_seconds=step, steps=1.0, counted=True)
    split = FlopSplit(model_flops, {"head": head_flops}, 0.0, 0.0)
    shapes = ModelShapes((vocab,), (Linear("lm_head", hidden, vocab, True),), 0, 0, 0)
    review = Review(run, nn.Linear(1, 1), split, peak, "bf16", True, ClockLog(), lambda: shapes, H100)
    diagnosis = diagnostics_module.vocab_alignment(review)
    saved = diagnosis.details["time_share"] * step
    assert saved == pytest.approx(0.1282 - 0.1080, rel=0.15)
    assert 0.274 + diagnosis.mfu_cost == pytest.approx(0.325, abs=0.01)
    assert diagnosis.details["padded_vocab_size"] == 32008


def measured_review(
    meter: MFUMeter, measured: dict[str, MatmulTime], compute_dtype: str = "bf16"
) -> list[Diagnosis]:
    """The meter's run reviewed again as profiled steps would have it: with measured matmul times."""
    return Diagnostics().review(
        meter._reader.run,
        model=meter._model,
        engine=meter.engine,
        run_features=meter._reader.run_features,
        peak_flops=PEAK_FLOPS,
        compute_dtype=compute_dtype,
        device_name=H100,
        measured_matmuls=measured,
    )


def test_a_measurement_in_the_run_takes_precedence_over_the_table():
    meter, _ = vocab_run(1001, device_name="Fake GPU", seconds=2.0)
    # The MLP's matmuls ran at 1 GFLOP/s, the head at a third of that: 3x slower per FLOP.
    measured = {"mlp": MatmulTime(seconds=0.5, flops=0.5e9), "head": MatmulTime(seconds=0.6, flops=0.2e9)}
    (diagnosis,) = [d for d in measured_review(meter, measured) if d.id == "vocab_alignment"]
    assert diagnosis.details["slowdown"] == pytest.approx(3.0)
    assert diagnosis.details["measured_in_run"] == 1.0
    saved = 0.6 * (1 - 1 / 3)  # of each 2 s step
    assert diagnosis.details["time_share"] == pytest.approx(saved / 2.0)
    mfu = meter.summary()["mfu"]
    assert diagnosis.mfu_cost == pytest.approx(mfu * 2.0 / (2.0 - saved) - mfu)
    assert "measured in this run" in diagnosis.message
    # The head at the pace of the step's other matmuls: measured, no cost, though the table says 5.1x.
    measured["head"] = MatmulTime(seconds=0.2, flops=0.2e9)
    assert "vocab_alignment" not in [d.id for d in measured_review(meter, measured)]


def test_a_slow_head_with_a_multiple_of_8_is_not_blamed_on_alignment():
    # A head of 1000 (a multiple of 8, off 64) measured 3x slower than the MLP: small matmuls are
    # slow for other reasons, and nothing measured says 1000 costs anything on this GPU.
    meter, _ = vocab_run(1000, device_name="Fake GPU", seconds=2.0)
    measured = {"mlp": MatmulTime(seconds=0.5, flops=0.5e9), "head": MatmulTime(seconds=0.6, flops=0.2e9)}
    assert "vocab_alignment" not in [d.id for d in measured_review(meter, measured)]


def test_no_tensor_cores_no_alignment_checks_even_with_a_measurement():
    meter, _ = vocab_run(1001, device_name="Fake GPU", seconds=2.0)
    measured = {"mlp": MatmulTime(seconds=0.5, flops=0.5e9), "head": MatmulTime(seconds=0.6, flops=0.2e9)}
    found = measured_review(meter, measured, compute_dtype="fp32")
    assert not {"vocab_alignment", "matmul_alignment"} & {d.id for d in found}


def test_the_heads_measured_slowdown_is_against_the_fastest_component():
    measured = {
        "mlp": MatmulTime(seconds=2.0, flops=1400.0),
        "attention_projections": MatmulTime(seconds=1.0, flops=800.0),
        "head": MatmulTime(seconds=1.0, flops=200.0),
    }
    # The best rate is 800 FLOP/s; the head's 200 FLOPs would take 0.25 s at it, and took 1 s.
    assert measured_slowdown(measured, "head") == pytest.approx(4.0)
    assert measured_slowdown(measured, "attention_projections") == pytest.approx(1.0)
    assert measured_slowdown(measured, "router") is None


def test_the_gpt2_vocabulary_pads_to_50304():
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    clock = FakeClock()
    batch = full_batch(1, 8)
    meter = make_meter(model, clock, batch)
    run_steps(meter, clock, batch, 1)
    meter.metrics()
    diagnosis = fired(meter, "vocab_alignment")
    assert diagnosis.value == 50257 and diagnosis.details["padded_vocab_size"] == 50304
    assert "50,304" in diagnosis.message


def test_the_old_ids_still_silence_their_checks():
    with pytest.warns(FutureWarning, match="'vocab_not_multiple_of_64' is now 'vocab_alignment'"):
        meter, _ = vocab_run(1001, device_name="Fake GPU", silence_diagnostics=["vocab_not_multiple_of_64"])
    assert "vocab_alignment" not in ids(meter)
    with pytest.warns(FutureWarning, match="'matmul_shapes' is now 'matmul_alignment'"):
        assert validate_ids(["matmul_shapes", "matmul_alignment"]) == ("matmul_alignment",)


def test_a_checkpoint_with_the_old_id_does_not_report_again():
    diagnostics = Diagnostics()
    diagnostics.load_state_dict(
        [{"id": "vocab_not_multiple_of_64", "message": "m", "value": 1.0, "threshold": 64.0}]
    )
    assert [diagnosis.id for diagnosis in diagnostics.fired] == ["vocab_alignment"]


def test_gpu_families_follow_the_peak_table():
    assert slowdowns.gpu_family(H100) == "hopper"
    assert slowdowns.gpu_family("NVIDIA H200") == "hopper"
    assert slowdowns.gpu_family("NVIDIA H100 PCIe") == "hopper"
    assert slowdowns.gpu_family("NVIDIA A100-SXM4-80GB") is None
    assert slowdowns.gpu_family(None) is None


# -- padding ---------------------------------------------------------------------------------------
def test_padding_reports_its_share_and_the_mfu_it_costs(clean_model):
    clock = FakeClock()
    batch = padded_batch([16, 8, 8, 8])  # 40 real tokens of 64 computed: 37.5% padding
    meter = make_meter(clean_model, clock, batch)
    run_steps(meter, clock, batch, 4, seconds=2.0)
    meter.metrics()
    diagnosis = fired(meter, "padding_waste")
    assert diagnosis.value == pytest.approx(24 / 64)
    # The step's time goes into its computed FLOPs; the padding's share of them is what the real
    # sequences alone would not have computed.
    useful, computed = model_truth(clean_model, batch), step_truth(clean_model, batch)
    wasted = 1 - useful / computed
    assert diagnosis.details["padding_flops_share"] == pytest.approx(wasted, rel=1e-9)
    mfu = useful / 2.0 / PEAK_FLOPS
    packed_mfu = useful / (2.0 * (1 - wasted)) / PEAK_FLOPS  # the same real tokens without the padding's time
    assert meter.summary()["mfu"] == pytest.approx(mfu)
    assert diagnosis.mfu_cost == pytest.approx(packed_mfu - mfu, rel=1e-9)
    for option in ("DataCollatorWithFlattening", "packing=True", "collate_fn", "37.5%"):
        assert option in diagnosis.message


def test_a_diagnosis_quotes_the_run_in_percent_not_the_read_that_fired_it(clean_model, caplog):
    """Padding fires at the first read (steps of 2 s); the run then speeds up (0.5 s steps): the
    diagnosis the report prints quotes the run's MFU, in percent like the report, and it was warned
    about once."""
    clock = FakeClock()
    batch = padded_batch([16, 8, 8, 8])
    meter = make_meter(clean_model, clock, batch)
    with caplog.at_level("WARNING", logger="mfu_callbacks"):
        run_steps(meter, clock, batch, 4, seconds=2.0)
        meter.metrics()
        first = fired(meter, "padding_waste")
        for _ in range(3):
            run_steps(meter, clock, batch, 8, seconds=0.5)
            meter.metrics()
    run_mfu = meter.summary()["mfu"]
    last = fired(meter, "padding_waste")
    assert f"MFU {run_mfu:.1%} would be about" in last.message and first.message != last.message
    assert last.mfu_cost == pytest.approx(
        run_mfu * last.details["padding_flops_share"] / (1 - last.details["padding_flops_share"]), rel=1e-6
    )
    assert sum("padding_waste" in record.getMessage() for record in caplog.records) == 1


def test_padding_below_ten_percent_is_not_reported(clean_model):
    clock = FakeClock()
    batch = padded_batch([16, 16, 16, 12])  # 4 of 64 tokens: 6.25%
    meter = make_meter(clean_model, clock, batch)
    run_steps(meter, clock, batch, 3)
    assert meter.metrics()["padding_fraction"] == pytest.approx(0.0625)
    assert "padding_waste" not in ids(meter)


# -- input wait ------------------------------------------------------------------------------------
def test_waiting_for_input_reports_the_mfu_it_costs(clean_model, monkeypatch):
    monkeypatch.setattr(_run_review, "_REVIEW_SECONDS", 0.0)  # every read reviews (its cadence: test_meter)
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch)
    run_steps(meter, clock, batch, 9, seconds=1.0, wait=0.1)
    meter.metrics()
    assert "input_bound" not in ids(meter), "nine steps are too few to judge"
    run_steps(meter, clock, batch, 3, seconds=1.0, wait=0.1)
    meter.metrics()
    diagnosis = fired(meter, "input_bound")
    # The first step has nothing before it to wait for: 11 waits of 0.1 s in 13.1 s.
    assert diagnosis.value == pytest.approx(1.1 / 13.1)
    flops = 12 * model_truth(clean_model, batch)
    assert diagnosis.mfu_cost == pytest.approx(flops / 12.0 / PEAK_FLOPS - flops / 13.1 / PEAK_FLOPS)
    assert "num_workers" in diagnosis.message and "pin_memory" in diagnosis.message
    run_steps(meter, clock, batch, 12, seconds=1.0, wait=0.5)
    meter.metrics()
    # Fired once; its figures follow the run: 11 x 0.1 s + 12 x 0.5 s of waiting in 31.1 s.
    assert fired(meter, "input_bound").value == pytest.approx(7.1 / 31.1)


# -- stragglers ------------------------------------------------------------------------------------
def pretend_two_ranks(monkeypatch, other_rank_slower_by: float) -> None:
    """A process group of two where the other rank's steps take longer by a factor, reduced by hand."""
    slower = 1.0 + other_rank_slower_by

    def sum_and_max(sums: Sequence[float], maxima: Sequence[float]) -> tuple[list[float], list[float]]:
        # The slowest rank's wall time, steps and last step, the read's place (latest and negated
        # earliest: both ranks read at the same one), then one step time per data-parallel group (a
        # slot per rank): this rank fills slot 0, the other rank slot 1.
        wall, steps, last, latest, earliest, mine, _ = maxima
        return [2 * value for value in sums], [
            wall * slower,
            steps,
            last * slower,
            latest,
            earliest,
            mine,
            mine * slower,
        ]

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "sum_and_max_over_ranks", sum_and_max)


def test_a_straggling_rank_is_reported(clean_model, monkeypatch):
    pretend_two_ranks(monkeypatch, 0.25)
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch)
    run_steps(meter, clock, batch, 10, seconds=0.4)
    metrics = meter.metrics()
    assert metrics["step_time_max"] == pytest.approx(0.5) and metrics["step_time_min"] == pytest.approx(0.4)
    diagnosis = fired(meter, "stragglers")
    assert diagnosis.value == pytest.approx(0.25)
    assert diagnosis.details["slowest_step_seconds"] == pytest.approx(0.5)
    # Both ranks at the fastest's 0.4 s: 2 ranks x 10 steps of FLOPs in 4 s instead of 5 s.
    flops = 2 * 10 * model_truth(clean_model, batch)
    assert diagnosis.mfu_cost == pytest.approx(flops / 4.0 / 2 / PEAK_FLOPS - flops / 5.0 / 2 / PEAK_FLOPS)
    assert "0.500 s" in diagnosis.message and "25.0%" in diagnosis.message


def test_ranks_within_ten_percent_are_not_stragglers(clean_model, monkeypatch):
    pretend_two_ranks(monkeypatch, 0.05)
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch)
    run_steps(meter, clock, batch, 10, seconds=0.4)
    meter.metrics()
    assert meter.diagnostics() == []


# -- recompute -------------------------------------------------------------------------------------
def test_gradient_checkpointing_reports_the_hfu_mfu_gap():
    model = make_eager(llama())
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(model, clock, batch)
    run_steps(meter, clock, batch, 3)
    meter.metrics()
    diagnosis = fired(meter, "recompute_cost")
    with_recompute = step_truth(model, batch)
    with checkpointing_off(model):
        without = step_truth(model, batch)
    assert diagnosis.value == pytest.approx(1 - without / with_recompute, rel=1e-9)
    summary = meter.summary()
    # No padding here: the whole HFU - MFU gap is recompute.
    assert diagnosis.details["hfu_mfu_gap_from_recompute"] == pytest.approx(
        summary["hfu"] - summary["mfu"], rel=1e-9
    )
    # Without checkpointing each 1 s step would take without / with_recompute of a second.
    assert diagnosis.mfu_cost == pytest.approx(summary["mfu"] * (with_recompute / without - 1), rel=1e-9)
    assert "gradient checkpointing" in diagnosis.message


def test_gradients_forced_onto_the_inputs_are_no_recompute():
    """Hardware FLOPs above model FLOPs without checkpointing (PEFT's enable_input_require_grads runs the
    first layer's input gradients, which nothing trains through) are not a rerun."""
    model = get_peft_model(make_eager(llama()), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.enable_input_require_grads()
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(model, clock, batch)
    run_steps(meter, clock, batch, 3)
    meter.metrics()
    assert step_truth(model, batch) > 1.01 * model_truth(model, batch), "the gap is there"
    assert fired(meter, "recompute_cost") is None


# -- matmul alignment ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("intermediate", "dtype", "fires"),
    [(100, "bf16", True), (100, "fp32", False), (104, "bf16", False), (104, "fp8", True)],
)
def test_misaligned_matmuls_without_a_measurement_claim_no_cost(intermediate: int, dtype: str, fires: bool):
    model = make_eager(llama(intermediate=intermediate))
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(model, clock, batch, dtype=dtype)
    run_steps(meter, clock, batch, 1)
    meter.metrics()
    diagnosis = fired(meter, "matmul_alignment")
    if not fires:
        assert diagnosis is None
        return
    # Gate, up and down projections (64 x intermediate each) per layer, 6 FLOPs per weight per token.
    mlp_flops = 6 * 32 * LAYERS * 3 * HIDDEN * intermediate
    assert diagnosis.flops_share == pytest.approx(mlp_flops / model_truth(model, batch), rel=1e-9)
    assert diagnosis.details["alignment"] == (16 if dtype == "fp8" else 8)
    assert diagnosis.details["misaligned_layers"] == 3 * LAYERS
    assert diagnosis.mfu_cost is None and "no cost is claimed" in diagnosis.message
    assert str(intermediate) in diagnosis.message


def test_misaligned_matmuls_on_a_measured_gpu_report_the_measured_cost(monkeypatch):
    # Measured for out_features only: the down projection's misaligned input is not costed.
    monkeypatch.setattr(slowdowns, "MEASURED", (hopper_row(NOT_MULTIPLE_OF_8, 2.0, tflops=1e-5),))
    model = make_eager(llama(intermediate=100))
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(model, clock, batch, peak=FakePeak(flops=PEAK_FLOPS, device_name=H100))
    run_steps(meter, clock, batch, 1, seconds=5.0)
    meter.metrics()
    diagnosis = fired(meter, "matmul_alignment")
    gate_and_up = 6 * 32 * LAYERS * 2 * HIDDEN * 100
    saved = gate_and_up / 1e7 * (1 - 1 / 2.0)
    assert diagnosis.details["time_share"] == pytest.approx(saved / 5.0, rel=1e-9)
    mfu = meter.summary()["mfu"]
    assert diagnosis.mfu_cost == pytest.approx(mfu * 5.0 / (5.0 - saved) - mfu, rel=1e-9)
    assert diagnosis.details["misaligned_layers"] == 3 * LAYERS
    assert "2.0x slower" in diagnosis.message


# -- fp32 adapters ---------------------------------------------------------------------------------
def lora_in_bf16() -> nn.Module:
    """A bf16 base whose LoRA adapters PEFT keeps in fp32 (its default autocast_adapter_dtype=True)."""
    model = get_peft_model(
        make_eager(llama(dtype=torch.bfloat16)), LoraConfig(r=8, target_modules="all-linear")
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    return model


def run_real_steps(
    meter: MFUMeter, clock: FakeClock, model: nn.Module, batch: Any, steps: int, *, autocast: bool
) -> None:
    for _ in range(steps):
        meter.start_step(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(**batch).loss.backward()
        clock.advance(1.0)
        meter.end_step()


def test_fp32_adapters_stay_silent_without_a_measured_cost(monkeypatch):
    monkeypatch.setattr(precision_checks, "FP32_ADAPTER_SLOWDOWN", None)
    model = lora_in_bf16()
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(model, clock, batch)
    run_real_steps(meter, clock, model, batch, 2, autocast=False)
    meter.metrics()
    assert "fp32_adapters" not in ids(meter)


@pytest.mark.parametrize("autocast", [False, True])
def test_fp32_adapters_on_a_bf16_base_report_the_measured_cost(monkeypatch, autocast: bool):
    monkeypatch.setattr(precision_checks, "FP32_ADAPTER_SLOWDOWN", 1.25)
    model = lora_in_bf16()
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(model, clock, batch)
    run_real_steps(meter, clock, model, batch, 2, autocast=autocast)
    meter.metrics()
    diagnosis = fired(meter, "fp32_adapters")
    if autocast:
        assert diagnosis is None, "under autocast the adapters' matmuls run in bf16 anyway"
        return
    # r=8 on q, k, v, o (64 -> 64, 32, 32, 64) and gate, up, down (64 <-> 128), two layers.
    lora_parameters = LAYERS * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert diagnosis.details["fp32_trainable_parameters"] == lora_parameters
    assert diagnosis.value == 1.25
    mfu = meter.summary()["mfu"]
    assert diagnosis.mfu_cost == pytest.approx(mfu * 0.25)
    assert 0 < diagnosis.flops_share < 0.5
    assert "1.25x" in diagnosis.message and "autocast_adapter_dtype=False" in diagnosis.message


# -- GPU clocks ------------------------------------------------------------------------------------
class FakeNvml(types.ModuleType):
    """The few pynvml calls the clock check makes; SM clocks in MHz, one per read."""

    NVML_CLOCK_SM = 1

    def __init__(self, clocks: Sequence[float], reasons: int = 0, maximum: float = 1980.0) -> None:
        super().__init__("pynvml")
        self.clocks, self.reasons, self.maximum = list(clocks), reasons, maximum
        self.clock_reads = 0
        self.handle_index: int | None = None

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        self.handle_index = index
        return "handle"

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> float:  # noqa: N802
        self.clock_reads += 1
        return self.clocks.pop(0) if len(self.clocks) > 1 else self.clocks[0]

    def nvmlDeviceGetMaxClockInfo(self, handle: str, clock: int) -> float:  # noqa: N802
        return self.maximum

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:  # noqa: N802
        return self.reasons


def test_a_throttled_sm_clock_is_reported_after_two_low_reads(clean_model, monkeypatch):
    fake_nvml = FakeNvml([1200, 1900, 1100], reasons=0x20 | 0x4)  # thermal slowdown and power cap
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(clocks, "SAMPLE_SECONDS", 0.0)  # every read samples
    monkeypatch.setattr(_run_review, "_REVIEW_SECONDS", 0.0)  # ... and reviews
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch, device="cuda:1")
    for _ in range(2):
        run_steps(meter, clock, batch, 2)
        meter.metrics()
        assert "gpu_clocks" not in ids(meter)
    run_steps(meter, clock, batch, 2)
    meter.metrics()
    diagnosis = fired(meter, "gpu_clocks")
    assert fake_nvml.handle_index == 5, "CUDA's device 1 is the host's GPU 5"
    assert diagnosis.value == pytest.approx((1200 + 1100) / 2 / 1980)
    mfu = meter.summary()["mfu"]
    assert diagnosis.mfu_cost == pytest.approx(mfu * (1980 / 1150 - 1))
    assert "power cap" in diagnosis.message and "thermal slowdown (software)" in diagnosis.message
    run_steps(meter, clock, batch, 2)
    meter.metrics()
    assert fake_nvml.clock_reads == 3, "once fired, NVML is no longer read"


def test_the_clock_is_sampled_at_most_once_every_five_seconds_however_often_the_run_logs(monkeypatch):
    fake_nvml = FakeNvml([1900])
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    now = [0.0]
    log = ClockLog(clock=lambda: now[0])
    for _ in range(1000):  # a read every 50 ms (logging every step): 50 s
        log.sample(torch.device("cuda", 0))
        now[0] += 0.05
    assert fake_nvml.clock_reads == 10
    assert log.reads == 10


def test_an_idle_gpu_or_missing_nvml_is_no_reading(clean_model, monkeypatch):
    idle = FakeNvml([900], reasons=0x1)
    monkeypatch.setitem(sys.modules, "pynvml", idle)
    monkeypatch.setattr(clocks, "SAMPLE_SECONDS", 0.0)
    clock = FakeClock()
    batch = full_batch(2, 16)
    meter = make_meter(clean_model, clock, batch, device="cuda:0")
    for _ in range(3):
        run_steps(meter, clock, batch, 1)
        meter.metrics()
    assert idle.clock_reads == 3 and meter.diagnostics() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    meter = make_meter(clean_model, clock, batch, device="cuda:0")
    run_steps(meter, clock, batch, 1)
    assert meter.metrics() and meter.diagnostics() == []


class UuidNvml:
    """NVML of a host with three GPUs and a MIG instance on the second: handles are names."""

    UUIDS = ("GPU-aaaa1111", "GPU-bbbb2222", "GPU-aaaa3333")
    MIG = "MIG-cccc4444"

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's names
        return len(self.UUIDS)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"gpu{index}"

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:  # noqa: N802
        return self.UUIDS[int(handle[3:])].encode()

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        if uuid == self.MIG:
            return "mig-on-gpu1"
        if uuid not in self.UUIDS:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")  # as pynvml raises for a partial UUID
        return f"gpu{self.UUIDS.index(uuid)}"

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: str) -> str:  # noqa: N802
        assert handle == "mig-on-gpu1"
        return "gpu1"


@pytest.mark.parametrize(
    ("visible", "device", "handle"),
    [
        (None, "cuda:2", "gpu2"),
        ("2,0", "cuda:0", "gpu2"),
        ("2,0", "cuda:1", "gpu0"),
        ("1gpu2,0", "cuda:0", "gpu1"),  # read as strtoul reads it
        ("2,-1,0", "cuda:1", None),  # a negative entry ends the list
        ("0,0", "cuda:0", None),  # a repeated entry hides every GPU
        ("GPU-aaaa3333,GPU-aaaa1111", "cuda:0", "gpu2"),  # whole UUIDs
        ("GPU-bbbb", "cuda:0", "gpu1"),  # a prefix of one UUID
        ("GPU-aaaa", "cuda:0", None),  # a prefix of two: CUDA and torch refuse it
        ("GPU-aaaa1111,3", "cuda:1", None),  # another kind of entry ends the list
        ("MIG-cccc4444", "cuda:0", "gpu1"),  # a MIG instance: its parent GPU's clock
    ],
)
def test_the_nvml_device_is_the_gpu_torch_calls_the_device(monkeypatch, visible, device, handle):
    from mfu_callbacks.diagnostics.clocks import nvml_handle

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_handle(UuidNvml(), torch.device(device)) == handle


@pytest.mark.parametrize(
    "visible",
    [
        "0",
        "3,1",
        "1gpu2,2ampere",
        "0,-1,2",
        "1,1",
        "",
        " 2, 3",
        "GPU-ab,GPU-cd",
        "GPU-ab,1",
        "MIG-x,MIG-y",
        "MIG-x,MIG-x",
        "x,1",
    ],
)
def test_visible_devices_are_read_as_torch_reads_them(monkeypatch, visible):
    from mfu_callbacks.diagnostics.clocks import visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_devices(visible) == torch.cuda._parse_visible_devices()


# -- silencing -------------------------------------------------------------------------------------
def test_a_silenced_diagnosis_never_fires(clean_model):
    clock = FakeClock()
    batch = padded_batch([16, 8, 8, 8])
    meter = make_meter(clean_model, clock, batch, silence_diagnostics=["padding_waste"])
    run_steps(meter, clock, batch, 2)
    meter.metrics()
    assert meter.diagnostics() == []


def test_unknown_ids_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="padding_wast'.*known ids are vocab_alignment, padding_waste"):
        MFUMeter(nn.Linear(2, 2), peak=FakePeak(flops=PEAK_FLOPS), silence_diagnostics=["padding_wast"])
    with pytest.raises(ValueError, match="list of diagnosis ids"):
        Diagnostics("padding_waste")
    assert len(DIAGNOSIS_IDS) == 8
