"""The Lightning integration, trained for real on a CPU, read back from Lightning's own CSVLogger."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from mfu_callbacks.lightning import MFUCallback
from tests.conftest import SEQ, FixedLengthTokens, HookSpy, collate, step_truth, tiny_llama
from tests.helpers.fakes import FLOPS_PER_TOKEN, SECONDS_PER_BATCH

PEAK_TFLOPS = 0.5
BATCH = 4


class TinyModule(L.LightningModule):
    def __init__(self, lora: bool = False) -> None:
        super().__init__()
        self.model = tiny_llama(lora=lora)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD((p for p in self.parameters() if p.requires_grad), lr=0.1)


def loader() -> DataLoader:
    return DataLoader(FixedLengthTokens(64), batch_size=BATCH, collate_fn=collate)


def fit(
    tmp_path: Path,
    callback: MFUCallback | None,
    *,
    lora: bool = False,
    accumulation: int = 1,
    steps: int = 6,
    devices: int = 1,
    wrap: Callable[[TinyModule], Any] = lambda module: module,
    module_class: type[TinyModule] = TinyModule,
    before: tuple[L.Callback, ...] = (),
    val_loader: DataLoader | None = None,
    **trainer_kwargs,
) -> tuple[TinyModule, list[dict[str, str]]]:
    module = module_class(lora=lora)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=devices,
        log_every_n_steps=2,
        accumulate_grad_batches=accumulation,
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[*before, *([callback] if callback else [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **trainer_kwargs},
    )
    trainer.fit(wrap(module), loader(), val_loader)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return module, rows


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_mfu_is_in_the_same_csv_row_as_the_loss_and_matches_an_independent_count(tmp_path, lora):
    _, rows = fit(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), lora=lora)
    measured = [row for row in rows if row.get("train/mfu")]
    assert len(measured) >= 2, rows
    step_flops = step_truth(tiny_llama(lora=lora), collate([FixedLengthTokens(64)[i] for i in range(BATCH)]))
    for row in measured:
        assert row["train/loss"], "MFU must share its row (and step) with the loss"
        step_time = float(row["train/step_time"])
        assert float(row["train/mfu"]) == pytest.approx(
            step_flops / (step_time * PEAK_TFLOPS * 1e12), rel=1e-5
        )
        assert float(row["train/tokens_per_sec"]) == pytest.approx(BATCH * 16 / step_time, rel=1e-5)


def test_gradient_accumulation_counts_every_micro_batch(tmp_path, fake_meter):
    _, rows = fit(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), accumulation=2)
    measured = [row for row in rows if row.get("train/mfu")]
    assert measured
    micro_flops = BATCH * SEQ * FLOPS_PER_TOKEN
    for row in measured:
        step_time = float(row["train/step_time"])
        assert step_time == pytest.approx(2 * SECONDS_PER_BATCH)
        assert float(row["train/tflops_per_gpu"]) == pytest.approx(
            2 * micro_flops / step_time / 1e12, rel=1e-5
        )


def test_losses_and_weights_are_identical_with_and_without_the_callback(tmp_path):
    module_a, rows_a = fit(tmp_path / "a", MFUCallback(peak_tflops=PEAK_TFLOPS))
    module_b, rows_b = fit(tmp_path / "b", None)
    assert [r["train/loss"] for r in rows_a if r.get("train/loss")] == [
        r["train/loss"] for r in rows_b if r.get("train/loss")
    ]
    for (name, a), (_, b) in zip(module_a.state_dict().items(), module_b.state_dict().items()):
        assert torch.equal(a, b), name


def assert_mfu_matches_the_truth(rows: list[dict[str, str]]) -> None:
    measured = [row for row in rows if row.get("train/mfu")]
    assert len(measured) >= 2, rows
    step_flops = step_truth(tiny_llama(), collate([FixedLengthTokens(64)[i] for i in range(BATCH)]))
    for row in measured:
        step_time = float(row["train/step_time"])
        assert float(row["train/mfu"]) == pytest.approx(
            step_flops / (step_time * PEAK_TFLOPS * 1e12), rel=1e-5
        )


def test_user_hooks_never_see_the_engine_build_and_mfu_stays_on(tmp_path):
    spy = HookSpy()

    def hooked(module: TinyModule) -> TinyModule:
        spy.attach(module, module.model.model.layers[0])
        return module

    with spy:
        _, rows = fit(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), wrap=hooked)
    assert spy.calls > 0 and spy.meta_calls == 0
    assert_mfu_matches_the_truth(rows)


class UnloggedModule(TinyModule):
    """``self.log`` inside a compiled training_step fails in dynamo with torch 2.13 (with or without callbacks)."""

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


@pytest.mark.slow  # torch.compile on the CPU: about 8 s
def test_a_compiled_lightning_module_is_counted_as_the_module(tmp_path, caplog):
    """Lightning puts compiled wrappers of the module's own methods on the instance; the copy runs them uncompiled."""
    with caplog.at_level(logging.ERROR, logger="mfu_callbacks"):
        _, rows = fit(
            tmp_path,
            MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1),
            wrap=torch.compile,
            module_class=UnloggedModule,
        )
    assert not [r for r in caplog.records if "stopped measuring MFU" in r.getMessage()]
    assert_mfu_matches_the_truth(rows)


def test_an_internal_error_is_logged_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from mfu_callbacks.meter import MFUMeter

    def broken(self, *args, **kwargs):
        raise RuntimeError("deliberate failure")

    monkeypatch.setattr(MFUMeter, "start_step", broken)
    with caplog.at_level(logging.ERROR, logger="mfu_callbacks"):
        _, rows = fit(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS))
    assert any(r.get("train/loss") for r in rows)
    assert not any(r.get("train/mfu") for r in rows)
    assert len([r for r in caplog.records if "stopped measuring MFU" in r.getMessage()]) == 1


@pytest.mark.multiprocess
def test_two_process_ddp_on_cpu_reports_both_ranks(tmp_path):
    _, rows = fit(
        tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), devices=2, strategy="ddp_spawn"
    )
    measured = [row for row in rows if row.get("train/mfu")]
    assert measured
    for row in measured:
        # Two ranks, each BATCH rows of 16 tokens per step: tokens/s counts both, per GPU counts one.
        step_time = float(row["train/step_time"])
        assert float(row["train/tokens_per_sec"]) == pytest.approx(2 * BATCH * 16 / step_time, rel=0.05)
        assert float(row["train/tokens_per_sec_per_gpu"]) == pytest.approx(BATCH * 16 / step_time, rel=0.05)
        assert float(row["train/step_time_max"]) >= float(row["train/step_time_min"])


@pytest.mark.slow
def test_lightning_cli_config_turns_mfu_on(tmp_path):
    """The YAML in configs/ enables the callback with its class_path alone."""
    root = Path(__file__).parents[2]
    command = [
        sys.executable,
        str(root / "examples" / "lightning_cli.py"),
        "fit",
        "--config",
        str(root / "configs" / "lightning.yaml"),
        "--trainer.max_steps",
        "6",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.accelerator",
        "cpu",
        "--trainer.callbacks.init_args.peak_tflops",
        "0.5",
        "--model.hidden_size",
        "32",
        "--model.seq_len",
        "16",
        "--data.seq_len",
        "16",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped measuring" not in result.stderr, result.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    with open(metrics_file) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/mfu")]
    assert rows and all(row["train/loss"] for row in rows)
    assert all(0 < float(row["train/mfu"]) < 1 for row in rows)


# -- never overwrite the module's keys; validation and saves are not training ------------------------
class OwnStepTime(TinyModule):
    """Logs a ``train/step_time`` of its own, under one of our names."""

    def training_step(self, batch, batch_idx):
        self.log("train/step_time", 123.0, on_step=True)
        return super().training_step(batch, batch_idx)


def test_a_name_the_module_logs_itself_keeps_its_value_and_ours_goes_beside_it(tmp_path, fake_meter):
    _, rows = fit(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), module_class=OwnStepTime)
    measured = [row for row in rows if row.get("train/mfu")]
    assert len(measured) >= 2, rows
    for row in measured:
        assert float(row["train/step_time"]) == 123.0
        assert float(row["train/mfu/step_time"]) == pytest.approx(SECONDS_PER_BATCH)


class Validated(TinyModule):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(**batch).loss)


class TakesTime(L.Callback):
    """Moves the meter's clock on while a validation batch loads and while a checkpoint is saved."""

    def __init__(self, clock) -> None:
        self.clock = clock

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.clock.advance(1.0)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.clock.advance(5.0)


def assert_validation_and_saves_left_out(callback: MFUCallback, rows: list[dict[str, str]]) -> None:
    """Every step is exactly its micro-batch on the fake clock: no input wait, no ``input_bound``."""
    measured = [row for row in rows if row.get("train/mfu")]
    assert len(measured) >= 5, rows
    for row in measured:
        assert float(row["train/step_time"]) == pytest.approx(SECONDS_PER_BATCH)
        assert float(row["train/input_wait_fraction"]) == pytest.approx(0.0, abs=1e-9)
    assert callback.session.meter._reader.run.steps >= 10
    assert "input_bound" not in [d.id for d in callback.session.meter.diagnostics()]


def test_validation_is_neither_step_time_nor_input_wait(tmp_path, fake_meter):
    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    _, rows = fit(
        tmp_path,
        callback,
        steps=12,
        module_class=Validated,
        before=(TakesTime(fake_meter),),
        val_loader=loader(),
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    assert len([row for row in rows if row.get("val/loss")]) == 6
    assert_validation_and_saves_left_out(callback, rows)


def test_a_checkpoint_save_is_neither_step_time_nor_input_wait(tmp_path, fake_meter):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    _, rows = fit(
        tmp_path, callback, steps=12, before=(TakesTime(fake_meter), saving), enable_checkpointing=True
    )
    assert len(list((tmp_path / "checkpoints").glob("*.ckpt"))) == 4
    assert_validation_and_saves_left_out(callback, rows)
