"""Reading a run's log (``_runlog.py``): which file of a folder, the MFU metrics of a row whatever the
logger's prefix, W&B references and an unreachable W&B run."""

from __future__ import annotations

import pytest

from mfu_callbacks.runs.logs import (
    RunLogError,
    find_log,
    metric_values,
    read_online_wandb_run,
    wandb_reference,
)


def test_the_metrics_of_a_row_are_read_under_any_prefix_and_only_when_numbers():
    row = {"train/mfu": "0.41", "mfu/step_time": 0.25, "eval/hfu": float("nan"), "tokens_per_sec": True}
    assert metric_values(row) == {"mfu": 0.41, "step_time": 0.25}


def test_a_folder_gives_its_latest_log_numbers_compared_as_numbers(tmp_path):
    for step in (500, 1000, 90):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
    found, choices = find_log(tmp_path)
    assert found == tmp_path / "checkpoint-1000" / "trainer_state.json" and choices == 3
    with pytest.raises(RunLogError, match="no such file or folder"):
        find_log(tmp_path / "missing")


def test_a_w_and_b_reference_is_read_as_one_only_in_its_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert wandb_reference("out/run1/checkpoint-500") is None  # beside an out folder: a local path
    assert wandb_reference("team/project/abc123") == "team/project/abc123"
    assert wandb_reference("wandb:out/run1/abc123") == "out/run1/abc123"
    assert wandb_reference("https://wandb.ai/team/project/runs/abc123?nw=1") == "team/project/abc123"
    assert wandb_reference("runs/main.csv") is None


def test_an_online_run_that_cannot_be_reached_is_one_line_naming_it():
    class Offline:
        def run(self, path):
            raise ConnectionError("Max retries exceeded with url: /graphql\n(Caused by NameResolutionError)")

    with pytest.raises(RunLogError) as raised:
        read_online_wandb_run("team/project/abc123", api=Offline())
    message = str(raised.value)
    assert "team/project/abc123" in message and "\n" not in message and "W&B login" in message
