"""The end-of-run report: its numbers, and that each integration prints it once when training ends."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from transformers import Trainer, TrainingArguments

from mfu_callbacks.attribution import FILE_NAME, MATMUL
from mfu_callbacks.flops import StepFlops
from mfu_callbacks.hardware import PeakInfo
from mfu_callbacks.runs.report import format_report
from mfu_callbacks.transformers import MFUCallback
from tests.conftest import FixedLengthTokens, collate, tiny_llama


@dataclass
class Diagnosis:
    id: str
    message: str


def test_the_report_states_the_run_figures_and_the_breakdown_shares():
    flops = StepFlops(
        model_flops=1000,
        hardware_flops=1300,
        tokens=90,
        padded_tokens=100,
        breakdown={
            "mlp": 600,
            "attention_scores": 150,
            "attention_projections": 250,
            "router": 0,
            "other": -0.001,
        },
    )
    peak = PeakInfo(flops=989.4e12, device_name="NVIDIA H100 80GB HBM3", dtype="bf16", source="datasheet")
    summary = {"mfu": 0.4123, "hfu": 0.45, "tflops_per_gpu": 407.9, "tokens_per_sec_per_gpu": 12345.6}
    text = format_report(
        summary, flops, peak, [Diagnosis("padding_waste", "10.0% of computed tokens are padding")]
    )
    assert "NVIDIA H100 80GB HBM3, bf16, 989.4 TFLOP/s" in text
    assert "MFU 41.2%" in text and "HFU 45.0%" in text and "tokens/s per GPU 12,346" in text
    lines = text.splitlines()
    shares = [line.split() for line in lines if line.strip().startswith(("mlp", "attention"))]
    assert shares == [["mlp", "60.0%"], ["attention_projections", "25.0%"], ["attention_scores", "15.0%"]]
    assert not any("router" in line for line in lines), "components without FLOPs are left out"
    assert not any("other" in line for line in lines), "a fit's rounding residue is not a component"
    assert "padding: 10.0% of computed tokens" in text
    assert "[padding_waste] 10.0% of computed tokens are padding" in text


def test_an_unknown_peak_says_how_to_supply_one():
    text = format_report({"tflops_per_gpu": 1.0}, None, None)
    assert "MFU not computed" in text and "MFU_PEAK_TFLOPS" in text and "tflops_per_gpu" not in text
    on_cpu = format_report({"tflops_per_gpu": 1.0}, None, None, device="cpu")
    assert (
        "peak: cpu (a CPU has no datasheet peak)" in on_cpu
        and "GPU" not in on_cpu.split("peak:")[1].split(",")[0]
    )
    assert "peak: unknown GPU (cuda:0)" in format_report({}, None, None, device="cuda:0")


def train(tmp_path, **options):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=FixedLengthTokens(64),
        data_collator=collate,
        callbacks=[MFUCallback(peak_tflops=0.5, warmup_steps=1, **options)],
    )
    trainer.train()
    return trainer


def test_the_trainer_prints_the_report_once_at_the_end(tmp_path, capsys):
    trainer = train(tmp_path)
    out = capsys.readouterr().out
    assert out.count("MFU report (mfu-callbacks)") == 1
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MFUCallback))
    assert f"MFU {callback.summary['mfu']:.1%}" in out
    assert "mlp" in out and "attention_scores" in out


def test_report_false_keeps_it_quiet(tmp_path, capsys, fake_meter):
    train(tmp_path, report=False)
    assert "MFU report" not in capsys.readouterr().out


def test_profiled_steps_are_printed_after_the_report_and_written_beside_the_summary(tmp_path, capsys):
    train(tmp_path, profile_steps=2)
    printed = capsys.readouterr().out
    assert printed.index("MFU report") < printed.index("Where the step time goes (2 profiled steps")
    document = json.loads((tmp_path / FILE_NAME).read_text())
    assert document["profiled_steps"] == 2
    assert any(b["name"].startswith(MATMUL) for b in document["buckets"])
    assert document["sum_of_buckets_seconds"] == pytest.approx(document["step_seconds"], rel=1e-9)
