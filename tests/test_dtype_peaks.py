"""MFU with a peak per matmul dtype: fp8 linears (``tests/helpers/fp8.py``) beside bf16 attention and head.

The meter runs on CPU but reads its peaks from the table as an H100 SXM (``hardware._identify`` is
made to name one): dense bf16 989.4 TFLOP/s, dense fp8 1,978.9 (the datasheet's sparse figures
halved), typed here from the datasheet. The FLOPs of each dtype come from FlopCounterMode of the
plain twin (``component_truth``): the converted linears (attention projections and MLP) ran in fp8,
the attention scores and the head in bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mfu_callbacks import MFUMeter, hardware
from mfu_callbacks.runs.report import format_report
from mfu_callbacks.runs.summary import describe_setup
from mfu_callbacks.testing import causal_lm, make_eager
from tests.conftest import VOCAB
from tests.flops.test_fp8 import BATCHES, component_truth
from tests.helpers.fp8 import convert_to_fp8

H100_BF16, H100_FP8 = 989.4e12, 1978.9e12
MEASURED = BATCHES[1:]  # the first builds the engine


@pytest.fixture(autouse=True)
def an_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device is an H100 SXM to the peak table (132 SMs), and nothing comes from the environment."""
    monkeypatch.delenv(hardware.PEAK_ENV_VAR, raising=False)
    monkeypatch.setattr(hardware, "_identify", lambda device, multiprocessors: ("NVIDIA H100 80GB HBM3", 132))


def bf16_twins() -> tuple[nn.Module, nn.Module]:
    """A tiny Llama in bf16 with its decoder linears in fp8 (head in bf16), and its plain twin."""
    twin = make_eager(causal_lm(vocab=VOCAB, layers=2, kv_heads=2, attention="eager")).to(torch.bfloat16)
    return convert_to_fp8(copy.deepcopy(twin), "tensorwise"), twin


def train(model: nn.Module, **options) -> tuple[MFUMeter, dict[str, float]]:
    """The measured steps, read once: the meter and its metrics."""
    meter = MFUMeter(model, warmup_steps=0, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in BATCHES:
        meter.start_step(batch)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end_step()
    values = meter.metrics()
    assert values, "the measured steps were read"
    return meter, values


def flops_by_dtype(twin: nn.Module) -> tuple[int, int]:
    """FLOPs of the measured steps that ran in fp8 (the converted linears) and in bf16 (the rest)."""
    fp8 = bf16 = 0
    for batch in MEASURED:
        parts = component_truth(twin, batch)
        fp8 += parts["attention_projections"] + parts["mlp"]
        bf16 += parts["attention_scores"] + parts["head"]
    return fp8, bf16


def test_each_dtype_is_judged_against_its_own_peak_and_named_in_the_setup_and_the_report() -> None:
    model, twin = bf16_twins()
    meter, values = train(model)
    fp8, bf16 = flops_by_dtype(twin)
    seconds = values["step_time"] * len(MEASURED)
    assert values["mfu"] == pytest.approx((fp8 / H100_FP8 + bf16 / H100_BF16) / seconds, rel=1e-9)
    # Between the two single-peak conventions: all at the fp8 peak (lower), all at the bf16 peak (torchtitan's).
    assert (fp8 + bf16) / seconds / H100_FP8 < values["mfu"] < (fp8 + bf16) / seconds / H100_BF16
    peaks = meter.dtype_peaks()
    assert peaks is not None
    assert {info.dtype: info.tflops for info in peaks.values()} == pytest.approx(
        {"fp8": 1978.9, "bf16": 989.4}
    )
    summary = meter.summary()
    assert summary["mfu"] == pytest.approx(values["mfu"], rel=1e-9), "the run's mean by the same rule"

    dtypes = meter.matmul_dtypes()
    setup = describe_setup(matmul_dtypes=dtypes, peak_per_dtype=True)
    assert setup["peak_rule"] == "per dtype"
    assert setup["matmul_dtypes"] == {
        "fp8": {"model_flops_share": pytest.approx(fp8 / (fp8 + bf16)), "peak_tflops": pytest.approx(1978.9)},
        "bf16": {
            "model_flops_share": pytest.approx(bf16 / (fp8 + bf16)),
            "peak_tflops": pytest.approx(989.4),
        },
    }
    report = format_report(summary, meter.run_flops(), meter.peak, (), None, dtypes)
    assert "dense per GPU at each matmul's dtype" in report
    assert f"{fp8 / (fp8 + bf16):.1%}   fp8 peak 1978.9 TFLOP/s" in report
    assert f"{bf16 / (fp8 + bf16):.1%}   bf16 peak 989.4 TFLOP/s" in report


def test_one_dtype_is_judged_as_before() -> None:
    """The plain twin (every matmul in bf16): today's formula, FLOPs over seconds over the bf16 peak."""
    model, twin = bf16_twins()
    meter, values = train(twin)
    fp8, bf16 = flops_by_dtype(twin)
    seconds = values["step_time"] * len(MEASURED)
    assert meter.dtype_peaks() is None and meter.peak is not None and meter.peak.dtype == "bf16"
    assert values["mfu"] == pytest.approx((fp8 + bf16) / seconds / H100_BF16, rel=1e-9)
    assert list(meter.matmul_dtypes()) == ["bf16"]


@pytest.mark.slow
def test_dtype_bf16_judges_every_matmul_against_the_bf16_peak() -> None:
    """torchtitan's convention, asked for with ``dtype="bf16"``: one peak whatever the matmul dtype."""
    model, twin = bf16_twins()
    meter, values = train(model, dtype="bf16")
    fp8, bf16 = flops_by_dtype(twin)
    seconds = values["step_time"] * len(MEASURED)
    assert meter.dtype_peaks() is None
    assert values["mfu"] == pytest.approx((fp8 + bf16) / seconds / H100_BF16, rel=1e-9)
    setup = describe_setup(matmul_dtypes=meter.matmul_dtypes(), peak_per_dtype=False)
    assert setup["peak_rule"] == "one peak"
    assert {dtype: part["peak_tflops"] for dtype, part in setup["matmul_dtypes"].items()} == pytest.approx(
        {"fp8": 989.4, "bf16": 989.4}
    )


@pytest.mark.slow
def test_the_framework_precision_names_the_dtype_of_the_matmuls_not_in_fp8() -> None:
    """An integration passes its precision as ``run_dtype`` (HF ``bf16=True``): it does not force one peak."""
    model, twin = bf16_twins()
    meter, values = train(model, run_dtype="bf16")
    fp8, bf16 = flops_by_dtype(twin)
    seconds = values["step_time"] * len(MEASURED)
    assert values["mfu"] == pytest.approx((fp8 / H100_FP8 + bf16 / H100_BF16) / seconds, rel=1e-9)


@pytest.mark.slow
def test_a_peak_given_by_hand_judges_every_matmul() -> None:
    model, twin = bf16_twins()
    meter, values = train(model, peak_tflops=500.0)
    fp8, bf16 = flops_by_dtype(twin)
    seconds = values["step_time"] * len(MEASURED)
    assert meter.dtype_peaks() is None
    assert values["mfu"] == pytest.approx((fp8 + bf16) / seconds / 500e12, rel=1e-9)
