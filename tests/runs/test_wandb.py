"""W&B offline, read back with W&B's own reader: MFU in the loss's history row, for each integration."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from mfu_callbacks._options import MFUOptions
from mfu_callbacks._session import MeterSession
from mfu_callbacks.runs.logs import wandb_records
from mfu_callbacks.runs.summary import RunSummary
from tests.conftest import FixedLengthTokens, accelerate_loop, collate, tiny_llama

wandb = pytest.importorskip("wandb")

PEAK_TFLOPS = 0.5
BATCH = 4
STEPS = 6


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # W&B keeps its settings (the run folder) per process: start the next test afresh


def read_run(folder: Path) -> list[dict]:
    """The records of the one offline run under ``folder``, through ``wandb leet inspect --json``."""
    logs = list(folder.rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one offline run under {folder}, found {logs}"
    return wandb_records(logs[0])


def history_of(records: list[dict]) -> list[dict]:
    """The run's history rows, in order."""
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def summary_of(records: list[dict]) -> dict:
    """The run summary as it stands at the end of the run."""
    summary: dict = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    return summary


def check_run(records: list[dict], loss_key: str, mfu_key: str, step_metric: str | None) -> None:
    rows = history_of(records)
    with_mfu = [row for row in rows if mfu_key in row]
    assert with_mfu, f"no history row has {mfu_key}: {rows}"
    for row in with_mfu:
        assert loss_key in row, f"{mfu_key} is not in the same history row as {loss_key}: {row}"
        assert 0 < row[mfu_key] < 1
    defined = {
        record["metric"].get("name"): record["metric"] for record in records if record["type"] == "metric"
    }
    assert mfu_key in defined
    if step_metric:
        assert defined[mfu_key].get("step_metric") == step_metric
    prefix = mfu_key.removesuffix("mfu")
    for name in ("mfu_status", "mfu_last_step", "hfu_last_step"):  # not charted by default
        assert defined[prefix + name].get("options", {}).get("hidden") is True, defined[prefix + name]
    assert not defined[mfu_key].get("options", {}).get("hidden")
    config = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"].get("update", {}))
        if record["type"] == "run":
            config.update(record["run"].get("config", {}).get("update", {}))
    described = config["mfu_callbacks"]
    assert described["peak_tflops"] == PEAK_TFLOPS
    assert described["dtype"] == "fp32"
    # The run summary's setup (runs.summary.describe_setup), not keys of its own.
    assert described["model_flops_per_token"] > 0
    assert sum(described["flops_breakdown_per_token"].values()) == pytest.approx(
        described["model_flops_per_token"]
    )
    assert described["versions"]["mfu_callbacks"] and described["world_size"] == 1
    summary = summary_of(records)
    assert 0 < summary["mfu_run/mfu"] < 1
    assert summary["mfu_run/hfu"] >= summary["mfu_run/mfu"]
    assert summary["mfu_run/status"] == 1 and summary["mfu_run/status_name"] == "measuring"
    status_key = mfu_key.removesuffix("mfu") + "mfu_status"
    assert all(row[status_key] == 1 for row in with_mfu), "a row with MFU says it is measuring"


class RecordingRun:
    """What a session touches on a W&B run (config, metric axes, summary), kept for the test to read."""

    def __init__(self) -> None:
        self.config = types.SimpleNamespace(values={})
        self.config.update = lambda values, allow_val_change=False: self.config.values.update(values)
        self.summary: dict[str, Any] = {}

    def define_metric(self, name: str, **options: Any) -> None:
        pass

    def log(self, row: dict) -> None:
        pass


def test_the_wandb_config_is_the_run_summary_setup_and_the_versions(tmp_path, monkeypatch):
    """One description of the setup: the W&B config holds the run summary's setup keys, with the same
    values, and the library versions; no key of its own."""
    run = RecordingRun()
    monkeypatch.setattr(wandb, "run", run)
    model = tiny_llama()
    batch = {"input_ids": torch.randint(0, 64, (2, 8))}
    batch["labels"] = batch["input_ids"]
    session = MeterSession(MFUOptions(peak_tflops=PEAK_TFLOPS, warmup_steps=1, report=False), "test")
    session.write_summary_to(tmp_path)
    session.attach(model)
    session.watch_forward(model)
    for _ in range(3):
        session.begin_step()
        model(**batch).loss.backward()
        session.end_step()
        session.read()
    session.finish()
    described = json.loads(json.dumps(run.config.values["mfu_callbacks"]))
    header = RunSummary.read(tmp_path)
    assert set(described) == set(header.setup) | {"versions"}
    assert {"device", "peak_tflops", "dtype", "model_flops_per_token", "model"} <= set(described)
    for key, value in header.setup.items():
        assert described[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert described["versions"] == header.versions


def collate_with_padding(rows):
    """A quarter of every row is padding: the padding diagnosis fires and lands in the run summary."""
    batch = collate(rows)
    batch["attention_mask"][:, -4:] = 0
    batch["labels"][:, -4:] = -100
    return batch


def train_hf(offline: Path, callback: Any, collator: Any = collate) -> None:
    """A Trainer run reporting to offline W&B, with ``callback``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(offline / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        logging_steps=2,
        report_to=["wandb"],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        run_name="hf",
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=FixedLengthTokens(64),
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    wandb.finish()


@pytest.mark.slow  # W&B's offline run read back by its own reader (a subprocess): CI's second tier
def test_hf_trainer_with_report_to_wandb(offline):
    from mfu_callbacks.transformers import MFUCallback

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1, profile_steps=1)
    train_hf(offline, callback, collate_with_padding)
    records = read_run(offline)
    check_run(records, "train/loss", "train/mfu", "train/global_step")
    summary = summary_of(records)
    assert "25.0%" in summary["mfu_diagnosis/padding_waste"]
    assert summary["mfu_diagnosis/padding_waste/mfu_cost"] > 0
    # The profiled steps' breakdown: a table with its bar chart, and its step time in the summary.
    rows = history_of(records)
    logged = {key.partition(".")[0] for row in rows for key in row}
    assert {"mfu_profile/breakdown", "mfu_profile/breakdown_chart_table"} <= logged
    assert summary["mfu_profile/step_seconds"] > 0
    check_online_reading_of(records, offline)


class FakeOnlineRun:
    """What the W&B API returns for a run on a server, filled from an offline run's records."""

    def __init__(self, records: list[dict]) -> None:
        self.rows = history_of(records)
        self.config: dict = {}
        for record in records:
            if record["type"] == "config":
                self.config.update(record["config"].get("update", {}))

    def scan_history(self):
        return iter(self.rows)


def check_online_reading_of(records: list[dict], offline: Path) -> None:
    """`compare` reads a run by entity/project/run_id as it reads the offline files of the same run."""
    from mfu_callbacks.runs.logs import read_online_wandb_run, read_run

    class Api:
        def run(self, path):
            assert path == "team/project/abc123"
            return FakeOnlineRun(records)

    online = read_online_wandb_run("team/project/abc123", api=Api())
    offline_run = read_run(next(offline.rglob("run-*.wandb")))
    assert online.windows == offline_run.windows and online.windows
    assert online.setup == offline_run.setup
    assert online.setup["world_size"] == 1 and online.setup["model"]["architecture"] == "LlamaForCausalLM"


def fit_lightning(offline: Path, callback: Any) -> None:
    """A Lightning fit logging to an offline WandbLogger, with ``callback``."""
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from tests.integrations.test_lightning import TinyModule

    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=2,
        logger=WandbLogger(project="lightning", save_dir=str(offline), offline=True),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), DataLoader(FixedLengthTokens(64), batch_size=BATCH, collate_fn=collate))
    wandb.finish()


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_lightning_with_wandb_logger(offline):
    from mfu_callbacks.lightning import MFUCallback

    fit_lightning(offline, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1))
    check_run(read_run(offline), "train/loss", "train/mfu", "trainer/global_step")


def loop_accelerate(offline: Path, **tracker_options: Any) -> None:
    """A hand-written Accelerate loop logging to W&B, with an ``MFUTracker`` of these options."""
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(cpu=True, log_with="wandb")
    accelerator.init_trackers("accelerate", init_kwargs={"wandb": {"dir": str(offline)}})
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(FixedLengthTokens(BATCH * STEPS), batch_size=BATCH, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=1, log_interval=2, **tracker_options)
    accelerate_loop(accelerator, model, optimizer, loader)
    accelerator.end_training()


@pytest.mark.slow  # W&B's offline run read back by its own reader (a subprocess): CI's second tier
def test_accelerate_with_log_with_wandb(offline):
    loop_accelerate(offline)
    check_run(read_run(offline), "train/loss", "train/mfu", None)


def failing_forward(model, batch):
    raise RuntimeError("no meta kernel for fused_op")


def check_run_without_mfu(records: list[dict], status_key: str) -> None:
    """Rows keep coming after the FLOP engine failed, each saying so; the run summary says why and the fix."""
    rows = history_of(records)
    with_status = [row for row in rows if status_key in row]
    assert len(with_status) >= 2 and all(row[status_key] == 0 for row in with_status), rows
    assert not any(status_key.removesuffix("_status") in row for row in rows)
    summary = summary_of(records)
    assert summary["mfu_run/status"] == 0 and summary["mfu_run/status_name"] == "off"
    assert "no meta kernel for fused_op" in summary["mfu_run/status_reason"]
    assert summary["mfu_run/status_fix"].startswith("pass forward=")


@pytest.mark.slow
def test_hf_trainer_run_without_mfu_says_why_in_wandb(offline):
    from mfu_callbacks.transformers import MFUCallback

    train_hf(
        offline,
        MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1, forward=failing_forward, real_step="off"),
    )
    check_run_without_mfu(read_run(offline), "train/mfu_status")


@pytest.mark.slow
def test_lightning_run_without_mfu_says_why_in_wandb(offline):
    from mfu_callbacks.lightning import MFUCallback

    fit_lightning(
        offline,
        MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1, forward=failing_forward, real_step="off"),
    )
    check_run_without_mfu(read_run(offline), "train/mfu_status")


@pytest.mark.slow
def test_accelerate_run_without_mfu_says_why_in_wandb(offline):
    loop_accelerate(offline, forward=failing_forward, real_step="off")
    check_run_without_mfu(read_run(offline), "train/mfu_status")
