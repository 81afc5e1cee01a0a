"""The run summary on disk: one line per window, a header rewritten only when it changes, reads that
cost the same at every step of a run, resumed runs that keep every window."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mfu_callbacks._options import MFUOptions
from mfu_callbacks._session import MeterSession
from mfu_callbacks.runs import summary as run_summary
from mfu_callbacks.runs.summary import (
    DEFAULT_FILENAME,
    WINDOWS_FILENAME,
    RunSummary,
    RunSummaryError,
    SummaryWriter,
)
from tests.conftest import tiny_llama

SETUP = {"device": "NVIDIA H100 SXM", "peak_tflops": 989.4, "dtype": "bf16"}


def metrics(step: int) -> dict[str, float]:
    return {"mfu": 0.4 + step * 1e-6, "step_time": 0.2, "tokens_per_sec": 1e5 + step}


def test_windows_are_appended_one_line_each_and_the_header_is_rewritten_only_when_it_changes(tmp_path):
    writer = SummaryWriter(tmp_path)
    writer.write_header(SETUP, {"code": 2, "name": "warming_up"})
    header_bytes = writer.bytes_written
    writer.write_header(SETUP, {"code": 2, "name": "warming_up"})
    assert writer.bytes_written == header_bytes, "an unchanged header is not written again"
    appended = []
    for step in range(1, 3001):
        before = writer.bytes_written
        writer.append(step, metrics(step))
        appended.append(writer.bytes_written - before)
    # Every window costs the same few bytes, whatever came before it: the run is never rewritten.
    assert max(appended) < 200 and max(appended[-100:]) <= max(appended[:100]) + 4
    writer.write_header(SETUP, {"code": 1, "name": "measuring"})
    writer.close()
    read = RunSummary.read(tmp_path)
    assert [window["step"] for window in read.windows] == list(range(1, 3001))
    assert read.windows[-1]["metrics"] == pytest.approx(metrics(3000))
    assert read.setup == SETUP and read.status == {"code": 1, "name": "measuring"}


def test_a_window_cut_off_mid_write_is_skipped_and_a_corrupt_one_is_named(tmp_path):
    RunSummary(SETUP).write(tmp_path)
    windows = tmp_path / WINDOWS_FILENAME
    windows.write_text('{"step":1,"metrics":{"mfu":0.4}}\n{"step":2,"metrics":{"mf')
    assert [window["step"] for window in RunSummary.read(tmp_path).windows] == [1]
    windows.write_text('{"step":1,"metrics":{"mfu":0.4}}\nnot json\n{"step":3,"metrics":{}}\n')
    with pytest.raises(RunSummaryError, match="line 2"):
        RunSummary.read(tmp_path)
    windows.unlink()
    with pytest.raises(RunSummaryError, match="copy both"):
        RunSummary.read(tmp_path / DEFAULT_FILENAME)


def test_a_summary_of_format_version_1_is_still_read(tmp_path):
    document = {
        "format": "mfu-callbacks run summary",
        "format_version": 1,
        "setup": SETUP,
        "versions": {"torch": "2.11.0"},
        "windows": [{"step": 10, "metrics": {"mfu": 0.41}}],
    }
    (tmp_path / DEFAULT_FILENAME).write_text(json.dumps(document))
    read = RunSummary.read(tmp_path)
    assert read.windows == [{"step": 10, "metrics": {"mfu": 0.41}}] and read.setup == SETUP


def test_a_resumed_writer_keeps_the_windows_up_to_its_step_and_a_new_run_starts_empty(tmp_path):
    first = SummaryWriter(tmp_path)
    for step in range(1, 11):
        first.append(step, metrics(step))
    first.close()
    resumed = SummaryWriter(tmp_path, resume_after=6)  # the checkpoint was saved at step 6
    for step in range(7, 13):
        resumed.append(step, metrics(step))
    resumed.close()
    assert [window["step"] for window in RunSummary.read(tmp_path).windows] == list(range(1, 13))
    SummaryWriter(tmp_path).close()
    assert (tmp_path / WINDOWS_FILENAME).read_text() == ""


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_a_read_costs_the_same_at_every_step_of_a_long_run(tmp_path, monkeypatch):
    """Over five hundred reads (one per step, as with logging_steps=1): the bytes written per read do not
    grow, nothing is synced to disk at a read, and the model's parameters are walked only when the setup
    is described (the first window, a checkpoint, the end), never at each read."""
    walks: list[int] = []
    fingerprint = run_summary.model_fingerprint
    monkeypatch.setattr(run_summary, "model_fingerprint", lambda model: walks.append(1) or fingerprint(model))
    syncs: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or fsync(fd))

    torch.manual_seed(0)
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = {"input_ids": torch.randint(0, 64, (1, 8))}
    batch["labels"] = batch["input_ids"]
    session = MeterSession(MFUOptions(peak_tflops=1.0, warmup_steps=1, report=False), "test")
    session.write_summary_to(tmp_path)
    session.attach(model)
    session.watch_forward(model)
    written: list[int] = []
    for _ in range(500):
        session.begin_step()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.end_step()
        before = session._outputs.writer.bytes_written if session._outputs.writer is not None else 0
        session.read()
        written.append(
            session._outputs.writer.bytes_written - before if session._outputs.writer is not None else 0
        )
    steady = written[10:]
    assert max(steady[-100:]) <= max(steady[:100]) + 8, "a read writes no more late in the run than early"
    assert max(steady) < 600, "a read appends one window, never the run"
    assert len(walks) == 1 and not syncs
    session.state_dict()  # a checkpoint: the setup is described again, both files synced
    assert len(walks) == 2 and len(syncs) == 2
    session.finish()
    assert len(RunSummary.read(tmp_path).windows) == 499  # the first step is warm-up (and built the engine)
