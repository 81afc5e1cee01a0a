"""``mfu_status``: every logged row says whether MFU is measured, and a run without MFU says why and
what to do, once in the framework's log, in the end-of-run report and in the run summary file.

Each integration is trained for real on the CPU: healthy (its MFU checked against torch's
FlopCounterMode at two sequence lengths), with a forward that cannot run on the meta device (the
FLOP engine cannot be built), and on a device without a known peak."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from mfu_callbacks import MFUOptions
from mfu_callbacks._guard import Guard
from mfu_callbacks._session import MeterSession
from mfu_callbacks._status import MFUStatus, Status
from mfu_callbacks.flops import ModelIntrospectionError
from mfu_callbacks.runs import wandb as run_wandb
from mfu_callbacks.runs.report import format_report
from mfu_callbacks.runs.summary import RunSummary
from tests.conftest import FixedLengthTokens, accelerate_loop, collate, full_batch, step_truth, tiny_llama
from tests.helpers.fakes import pretend_two_ranks

PEAK_TFLOPS = 0.5
BATCH = 4
STEPS = 6  # read at steps 2, 4 and 6
WARMUP = 2  # step 1 builds the engine, step 2 is warm-up: the read at step 2 has nothing measured
WARNING = "MFU is not measured"


def forward_without_meta_kernel(model: Any, batch: Any) -> Any:
    """A forward that fails on the meta device, as custom kernels without a meta implementation do."""
    raise RuntimeError("no meta kernel for fused_op")


@dataclass
class Run:
    rows: list[dict[str, float]]  # the logged rows that carry the loss, prefixes removed
    warnings: list[str] = field(default_factory=list)  # what the framework's log got from us


@contextmanager
def records_of(logger_name: str) -> Iterator[list[str]]:
    """The messages that reach ``logger_name``'s own handlers (transformers' logger does not propagate)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def train_hf(tmp_path: Path, length: int, **options: Any) -> Run:
    from transformers import Trainer, TrainingArguments

    from mfu_callbacks.transformers import MFUCallback

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    data = FixedLengthTokens(64, length)
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=data,
        data_collator=collate,
        callbacks=[MFUCallback(**options)],
    )
    with records_of("transformers") as messages:
        trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    return Run(rows, [message for message in messages if WARNING in message])


def train_lightning(tmp_path: Path, length: int, **options: Any) -> Run:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mfu_callbacks.lightning import MFUCallback
    from tests.integrations.test_lightning import TinyModule

    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[MFUCallback(**options)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(FixedLengthTokens(64, length), batch_size=BATCH, collate_fn=collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a second warning must show, not be folded into the first
        trainer.fit(TinyModule(), loader)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    rows = [{key.removeprefix("train/"): float(v) for key, v in row.items() if v} for row in table]
    return Run(
        [row for row in rows if "loss" in row], [str(w.message) for w in caught if WARNING in str(w.message)]
    )


def train_accelerate(tmp_path: Path, length: int, **options: Any) -> Run:
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker
    from tests.integrations.test_accelerate import MemoryTracker

    memory = MemoryTracker()
    accelerator = Accelerator(cpu=True, log_with=[memory], project_dir=str(tmp_path))
    accelerator.init_trackers("status")
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(FixedLengthTokens(BATCH * STEPS, length), batch_size=BATCH, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with records_of("mfu_callbacks.accelerate") as messages:
        MFUTracker(accelerator, model, log_interval=2, **options)
        accelerate_loop(accelerator, model, optimizer, loader)
        accelerator.end_training()
    rows = [
        {key.removeprefix("train/"): value for key, value in values.items()} for _, values in memory.records
    ]
    return Run(rows, [message for message in messages if WARNING in message])


TRAIN = {"transformers": train_hf, "lightning": train_lightning, "accelerate": train_accelerate}


def with_status(run: Run) -> list[dict[str, float]]:
    return [row for row in run.rows if "mfu_status" in row]


def summary_status(tmp_path: Path) -> dict[str, Any]:
    (path,) = tmp_path.rglob("mfu_summary.json")
    return json.loads(path.read_text())["status"]


@pytest.mark.parametrize("length", [8, 16])
@pytest.mark.parametrize("integration", list(TRAIN))
def test_a_healthy_run_says_warming_up_then_measuring_in_every_row(tmp_path, capsys, integration, length):
    run = TRAIN[integration](
        tmp_path, length, peak_tflops=PEAK_TFLOPS, warmup_steps=WARMUP, summary_dir=tmp_path
    )
    rows = with_status(run)
    assert [row["mfu_status"] for row in rows] == [
        MFUStatus.WARMING_UP,
        MFUStatus.MEASURING,
        MFUStatus.MEASURING,
    ]
    truth = step_truth(tiny_llama(), collate([FixedLengthTokens(64, length)[i] for i in range(BATCH)]))
    for row in rows:
        measuring = row["mfu_status"] == MFUStatus.MEASURING
        assert ("mfu" in row) == measuring, row
        if measuring:
            assert row["mfu"] == pytest.approx(truth / (row["step_time"] * PEAK_TFLOPS * 1e12), rel=1e-5)
    assert run.warnings == []
    assert summary_status(tmp_path)["name"] == "measuring"
    assert "MFU not measured" not in capsys.readouterr().out


def raising_token_counter(batch: Any) -> Any:
    raise KeyError("no 'tokens' in this batch")


def empty_token_counter(batch: Any) -> Any:
    return {}  # a batch in which no tokens can be found: every step is left out


# fault: (option, a phrase of the reason, the start of the fix)
FAULTS = {
    "forward_on_meta": (  # with the real step not watched (else it is counted: tests/flops/test_real_step.py)
        {"forward": forward_without_meta_kernel, "real_step": "off"},
        "no meta kernel for fused_op",
        "pass forward=",
    ),
    "raising_counter": (
        {"token_counter": raising_token_counter},
        "no 'tokens' in this batch",
        "read the traceback",
    ),
    "nothing_counted": (
        {"token_counter": empty_token_counter},
        "no batch could be counted",
        "pass token_counter=",
    ),
}


@pytest.mark.parametrize(
    ("integration", "fault"),
    [(integration, "forward_on_meta") for integration in TRAIN]
    + [("transformers", "raising_counter"), ("lightning", "nothing_counted")],
)
def test_an_engine_that_cannot_be_built_is_said_in_every_row_the_log_and_the_report(
    tmp_path, capsys, integration, fault
):
    option, reason, fix = FAULTS[fault]
    run = TRAIN[integration](
        tmp_path, 16, peak_tflops=PEAK_TFLOPS, warmup_steps=1, summary_dir=tmp_path, **option
    )
    assert len(run.rows) >= 3, run.rows
    if integration != "accelerate":  # Accelerate logs every step; the status comes with the reads
        assert all(row.get("mfu_status") == MFUStatus.OFF for row in run.rows), run.rows
    assert [row["mfu_status"] for row in with_status(run)] == [MFUStatus.OFF] * 3
    assert not any("mfu" in row for row in run.rows)
    assert len(run.warnings) == 1, run.warnings
    assert reason in run.warnings[0] and f"Fix: {fix}" in run.warnings[0]
    report = capsys.readouterr().out
    assert report.count("MFU report (mfu-callbacks)") == 1
    assert "MFU not measured (off)" in report and reason in report and f"fix: {fix}" in report
    status = summary_status(tmp_path)
    assert status["code"] == MFUStatus.OFF and reason in status["reason"] and status["fix"].startswith(fix)


def test_a_device_without_a_known_peak_logs_throughput_and_says_how_to_give_the_peak(tmp_path, capsys):
    run = train_hf(tmp_path, 16, warmup_steps=WARMUP, summary_dir=tmp_path)
    rows = with_status(run)
    assert [row["mfu_status"] for row in rows] == [MFUStatus.WARMING_UP, MFUStatus.NO_PEAK, MFUStatus.NO_PEAK]
    assert all("tflops_per_gpu" in row and "mfu" not in row for row in rows[1:])
    assert len(run.warnings) == 1 and "peak_tflops=" in run.warnings[0]
    assert "MFU not computed (pass peak_tflops=" in capsys.readouterr().out
    assert summary_status(tmp_path)["name"] == "no_peak"


def test_the_guard_names_what_stopped_why_and_the_fix():
    guard = Guard("owner")
    assert guard.reason is None and guard.fix is None
    guard.run(lambda: (_ for _ in ()).throw(ModelIntrospectionError("cannot trace")))
    assert (
        guard.reason == "measuring MFU stopped after an internal error: ModelIntrospectionError: cannot trace"
    )
    assert guard.fix is not None and guard.fix.startswith("pass forward=")
    other = Guard("owner")
    other.run(lambda: 1 / 0)
    assert other.fix is not None and "report it" in other.fix


def test_the_report_of_a_run_without_mfu_states_the_reason_and_the_fix():
    status = Status(MFUStatus.OFF, "the engine broke", "pass forward=")
    text = format_report({}, None, None, (), status)
    assert "MFU not measured (off): the engine broke" in text and "fix: pass forward=" in text
    assert "unknown GPU" not in text, "no peak was looked up: the run never measured"
    assert "MFU not measured" not in format_report({"mfu": 0.4}, None, None, (), Status(MFUStatus.MEASURING))


def test_the_run_summary_file_keeps_the_status(tmp_path):
    summary = RunSummary()
    summary.status = Status(MFUStatus.OFF, "why", "what to do").as_dict()
    again = RunSummary.read(summary.write(tmp_path))
    assert again.status == {"code": 0, "name": "off", "reason": "why", "fix": "what to do"}


def test_a_window_in_which_another_rank_failed_says_so_and_the_run_ends_saying_so(monkeypatch, fake_meter):
    pretend_two_ranks(monkeypatch, [], other_failed=True)
    said: list[str] = []
    session = MeterSession(
        MFUOptions(peak_tflops=PEAK_TFLOPS, warmup_steps=0, report=False), "owner", warn=said.append
    )
    session.attach(tiny_llama())
    for _ in range(2):
        session.begin_step(full_batch(2, 8))
        session.end_step()
        metrics = session.read()
    assert "train/mfu" not in metrics and metrics["train/mfu_status"] == MFUStatus.NOT_COUNTED
    session.finish()
    assert session.status.code == MFUStatus.NOT_COUNTED
    assert len(said) == 1 and "a rank could not count" in said[0]


class FakeWandbRun:
    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}


def test_the_wandb_summary_carries_the_status_its_reason_and_the_fix():
    run = FakeWandbRun()
    run_wandb.summarize_run(run, {}, (), Status(MFUStatus.OFF, "the engine broke", "pass forward="))
    assert run.summary == {
        "mfu_run/status": 0,
        "mfu_run/status_name": "off",
        "mfu_run/status_reason": "the engine broke",
        "mfu_run/status_fix": "pass forward=",
    }
    healthy = FakeWandbRun()
    run_wandb.summarize_run(healthy, {"mfu": 0.4}, (), Status(MFUStatus.MEASURING))
    assert healthy.summary == {"mfu_run/mfu": 0.4, "mfu_run/status": 1, "mfu_run/status_name": "measuring"}
