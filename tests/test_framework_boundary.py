"""What the integrations rely on in each framework, checked against the installed versions.

The integrations use public APIs only; where they depend on how a framework behaves (the order in
which the Trainer calls its callbacks, when Lightning writes its logs, the signatures of the
Accelerate methods they wrap), these tests say so plainly and fail on an upgrade that changes it,
instead of the callbacks' guard turning it into one log line.
"""

from __future__ import annotations

import csv
import inspect
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tests.conftest import FixedLengthTokens, collate, tiny_llama

PEAK_TFLOPS = 0.5
BATCH = 4


# -- Hugging Face Trainer --------------------------------------------------------------------------
def hf_train(tmp_path, callback, reporter=None, steps: int = 6):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        logging_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    callbacks = [c for c in (reporter, callback) if c is not None]
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=FixedLengthTokens(64),
        data_collator=collate,
        callbacks=callbacks,
    )
    if (
        reporter is not None
    ):  # where the Trainer puts its own reporters (W&B, TensorBoard): before user callbacks
        trainer.callback_handler.pop_callback(reporter)
        trainer.callback_handler.callbacks.insert(1, reporter)
    trainer.train()
    return trainer


def recording_reporter():
    from transformers import TrainerCallback

    class RecordingReporter(TrainerCallback):
        def __init__(self) -> None:
            self.records: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.records.append(dict(logs))

    return RecordingReporter()


def test_hf_the_callback_finds_the_trainers_callback_list_and_runs_first(tmp_path, caplog):
    """With the installed transformers the handler's list is found (no warning) and MFUCallback is
    first in it, so its on_log runs before any reporter's."""
    from mfu_callbacks.transformers import MFUCallback

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    reporter = recording_reporter()
    with caplog.at_level(logging.WARNING, logger="mfu_callbacks"):
        trainer = hf_train(tmp_path, callback, reporter)
    assert trainer.callback_handler.callbacks[0] is callback
    assert trainer.callback_handler.callbacks.count(callback) == 1
    assert not [r for r in caplog.records if "callback list" in r.getMessage()]
    assert [r for r in reporter.records if "mfu" in r and "loss" in r]


def test_hf_the_saved_log_record_equals_what_the_reporters_were_handed(tmp_path):
    """``state.log_history`` (saved to trainer_state.json) and the reporters hold the same record."""
    from mfu_callbacks.transformers import MFUCallback

    reporter = recording_reporter()
    trainer = hf_train(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), reporter)
    saved = [row for row in trainer.state.log_history if "loss" in row]
    handed = [record for record in reporter.records if "loss" in record]
    assert len(saved) == len(handed) == 3
    assert sum("mfu" in record for record in handed) >= 2
    for row, record in zip(saved, handed):
        assert row == {**record, "step": row["step"]}


def test_hf_a_callback_list_that_cannot_be_found_gives_one_clear_warning(tmp_path, caplog):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from mfu_callbacks.transformers import MFUCallback

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with caplog.at_level(logging.WARNING, logger="mfu_callbacks"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=None)  # no Trainer around it
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not find the Trainer's callback list" in warnings[0]
    assert not callback.session.guard.failed


def test_hf_the_summary_is_kept_on_the_callback_not_in_trainer_state(tmp_path):
    from mfu_callbacks.transformers import MFUCallback

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1, report=False)
    trainer = hf_train(tmp_path, callback)
    assert 0 < callback.summary["mfu"] < 1
    assert not hasattr(trainer.state, "mfu_summary")


# -- Lightning -------------------------------------------------------------------------------------
def test_lightning_the_logging_decision_matches_lightnings_own(tmp_path):
    """Over a run with log_every_n_steps=3, accumulate_grad_batches=2, an epoch that ends halfway through
    an accumulation, and a stop requested mid-run, the public-state decision equals Lightning's
    private ``should_update_logs`` at every optimizer step (read here only, never by the package)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mfu_callbacks.lightning import MFUCallback, lightning_writes_logs_now
    from tests.integrations.test_lightning import TinyModule

    class Compare(L.Callback):
        def __init__(self) -> None:
            self.decisions: list[tuple[int, bool, bool]] = []
            self.last_step = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 6 and batch_idx % 2 == 1:  # the batch that ends step 7
                trainer.should_stop = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.last_step:
                return  # an accumulation batch: the optimizer did not step
            self.last_step = trainer.global_step
            lightning = trainer._logger_connector.should_update_logs
            self.decisions.append((trainer.global_step, lightning_writes_logs_now(trainer), lightning))

    compare = Compare()
    trainer = L.Trainer(
        max_steps=20,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=3,
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path, name="run", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[compare, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)],
    )
    # 7 batches per epoch: steps end on batches 2, 4, 6 and 7 (the epoch's end) of each epoch.
    trainer.fit(TinyModule(), DataLoader(FixedLengthTokens(7 * BATCH), batch_size=BATCH, collate_fn=collate))
    assert [step for step, _, _ in compare.decisions] == [1, 2, 3, 4, 5, 6, 7]
    assert [ours for _, ours, _ in compare.decisions] == [lightning for _, _, lightning in compare.decisions]
    assert [step for step, ours, _ in compare.decisions if ours] == [3, 6, 7]
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/mfu")]
    assert rows and all(row["train/loss"] for row in rows)


def test_lightning_module_back_references_are_named_as_the_replica_expects():
    """The FLOP engine's replica does not copy a LightningModule's references to the Trainer, Fabric and mesh."""
    from lightning import LightningModule

    from mfu_callbacks.flops.meta_copy.replica import _BACK_REFERENCES

    assert set(_BACK_REFERENCES) <= set(vars(LightningModule()))


def test_lightning_fabric_module_shows_the_model_through_its_public_property():
    from lightning.fabric.wrappers import _FabricModule

    from mfu_callbacks.flops.unwrap import _WRAPPERS

    assert ("_FabricModule", "module") in _WRAPPERS
    assert isinstance(inspect.getattr_static(_FabricModule, "module"), property)


# -- Accelerate ------------------------------------------------------------------------------------
def test_accelerate_the_wrapped_methods_have_the_signatures_the_tracker_relies_on():
    """``MFUTracker`` merges its metrics into ``values`` (first argument or keyword) of
    ``Accelerator.log`` and runs before ``Accelerator.end_training``; everything else passes through."""
    from accelerate import Accelerator

    def parameters(method) -> list[str]:
        # Accelerate's @on_main_process wraps log in an (*args, **kwargs) closure without functools.wraps
        undecorated = inspect.getclosurevars(method).nonlocals.get("function", method)
        return list(inspect.signature(undecorated).parameters)

    assert parameters(Accelerator.log) == ["self", "values", "step", "log_kwargs"]
    assert parameters(Accelerator.end_training) == ["self"]


def test_accelerate_the_prepared_optimizer_is_a_wrapper_around_the_one_that_steps():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    model, prepared = accelerator.prepare(model, inner)
    assert prepared is not inner and prepared.optimizer is inner


def test_accelerate_only_the_models_optimizer_ends_a_step_and_log_arguments_pass_through():
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker
    from tests.integrations.test_accelerate import MemoryTracker

    memory = MemoryTracker()
    accelerator = Accelerator(cpu=True, log_with=[memory])
    accelerator.init_trackers("test")
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(FixedLengthTokens(BATCH * 4), batch_size=BATCH, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    other = torch.nn.Linear(2, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    tracker = MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=0, log_interval=2)
    for step, batch in enumerate(loader):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        other(torch.ones(1, 2)).sum().backward()
        other_optimizer.step()  # another model's optimizer: not a step of this one
        if step == 1:
            accelerator.log(values={"train/loss": 1.0}, step=step)
        elif step == 3:
            accelerator.log({"train/loss": 1.0}, step, {"memory": {}})
    assert tracker.session.optimizer_steps == 4
    assert [step for step, values in memory.records if "train/mfu" in values] == [1, 3]
    accelerator.end_training()
    assert tracker.final_summary
    other_optimizer.step()
    optimizer.step()  # after end_training the hook is gone
    assert tracker.session.optimizer_steps == 4
