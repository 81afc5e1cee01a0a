"""The Hugging Face Trainer integration, trained for real on a CPU."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from mfu_callbacks.transformers import MFUCallback
from tests.conftest import SEQ, FixedLengthTokens, HookSpy, collate, step_truth, tiny_llama, torchrun
from tests.helpers.fakes import FLOPS_PER_TOKEN, SECONDS_PER_BATCH

PEAK_TFLOPS = 0.5
BATCH = 4


class RecordingReporter(TrainerCallback):
    """Stands in for a reporting callback (W&B, TensorBoard): keeps a copy of each logs dict it is handed."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.records.append(dict(logs))


def train(
    tmp_path,
    *,
    callback: MFUCallback | None,
    lora: bool = False,
    accumulation: int = 1,
    steps: int = 6,
    reporter: TrainerCallback | None = None,
    gradient_checkpointing: bool = False,
    spy: HookSpy | None = None,
    trainer_class: type[Trainer] = Trainer,
    eval_dataset=None,
    before: tuple[TrainerCallback, ...] = (),
    **arguments,
):
    model = tiny_llama(lora=lora)
    if spy is not None:
        spy.attach(model, model.model.layers[0])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation,
        logging_steps=2,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing,
        **{"save_strategy": "no", **arguments},
    )
    callbacks = [*before, *(c for c in (reporter, callback) if c is not None)]
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=FixedLengthTokens(64),
        eval_dataset=eval_dataset,
        data_collator=collate,
        callbacks=callbacks,
    )
    if reporter is not None:  # a reporter of the Trainer's own kind runs before user callbacks: put it there
        trainer.callback_handler.callbacks.remove(reporter)
        trainer.callback_handler.callbacks.insert(1, reporter)
    trainer.train()
    return trainer, model


def test_a_logged_step_is_read_at_its_end_before_the_trainer_waits_for_the_loss(tmp_path):
    """The read runs at the step's end (while a GPU still works on the step, before the Trainer's
    ``loss.item()``), not in ``on_log`` after it, and its metrics go into that step's row."""
    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    read, in_on_log, reads = callback.session.read, [False], []
    on_log = callback.on_log

    def spied_read():
        reads.append("on_log" if in_on_log[0] else "step end")
        return read()

    def spied_on_log(*args, **kwargs):
        in_on_log[0] = True
        try:
            return on_log(*args, **kwargs)
        finally:
            in_on_log[0] = False

    callback.session.read = spied_read
    callback.on_log = spied_on_log
    trainer, _ = train(tmp_path, callback=callback, steps=6)
    assert reads == ["step end"] * 3
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert all("mfu" in row for row in rows[1:]), rows


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_mfu_is_logged_with_the_loss_and_matches_an_independent_count(tmp_path, lora):
    reporter = RecordingReporter()
    trainer, model = train(
        tmp_path, callback=MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), lora=lora, reporter=reporter
    )
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4, 6]
    measured = [row for row in rows if "mfu" in row]
    assert len(measured) >= 2, rows
    step_flops = step_truth(tiny_llama(lora=lora), collate([FixedLengthTokens(64)[i] for i in range(BATCH)]))
    for row in measured:
        expected = step_flops / (row["step_time"] * PEAK_TFLOPS * 1e12)
        assert row["mfu"] == pytest.approx(expected, rel=1e-6)
        assert row["tflops_per_gpu"] == pytest.approx(step_flops / row["step_time"] / 1e12, rel=1e-6)
        assert row["tokens_per_sec"] == pytest.approx(BATCH * 16 / row["step_time"], rel=1e-6)
        assert row["padding_fraction"] == 0.0
    # The reporting callback saw MFU in the same dict as the loss.
    reported = [r for r in reporter.records if "loss" in r and "mfu" in r]
    assert len(reported) == len(measured)


def test_lora_with_gradient_checkpointing_logs_the_model_flops_of_the_run_without(tmp_path):
    """The logged model FLOPs are those of the same run with checkpointing off (what the test above logs:
    the truth of the model as built); the recompute and the input gradients that checkpointing's hook
    forces show in HFU alone."""
    trainer, model = train(
        tmp_path,
        callback=MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1),
        lora=True,
        gradient_checkpointing=True,
    )
    rows = [row for row in trainer.state.log_history if "mfu" in row]
    assert len(rows) >= 2, trainer.state.log_history
    batch = collate([FixedLengthTokens(64)[i] for i in range(BATCH)])
    without_checkpointing = step_truth(tiny_llama(lora=True), batch)
    as_run = step_truth(model, batch)  # checkpointed, with the hook
    assert as_run > without_checkpointing
    for row in rows:
        assert row["tflops_per_gpu"] * row["step_time"] * 1e12 == pytest.approx(
            without_checkpointing, rel=1e-6
        )
        assert row["hfu"] / row["mfu"] == pytest.approx(as_run / without_checkpointing, rel=1e-6)


def test_user_hooks_never_see_the_engine_build_and_mfu_stays_on(tmp_path):
    with HookSpy() as spy:
        trainer, _ = train(
            tmp_path, callback=MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), steps=4, spy=spy
        )
    assert spy.calls > 0 and spy.meta_calls == 0
    measured = [row for row in trainer.state.log_history if "mfu" in row]
    assert len(measured) >= 2, trainer.state.log_history
    step_flops = step_truth(tiny_llama(), collate([FixedLengthTokens(64)[i] for i in range(BATCH)]))
    for row in measured:
        assert row["mfu"] == pytest.approx(step_flops / (row["step_time"] * PEAK_TFLOPS * 1e12), rel=1e-6)


def test_gradient_accumulation_counts_every_micro_batch(tmp_path, fake_meter):
    trainer, _ = train(
        tmp_path, callback=MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1), accumulation=2
    )
    measured = [row for row in trainer.state.log_history if "mfu" in row]
    assert measured
    micro_flops = BATCH * SEQ * FLOPS_PER_TOKEN
    for row in measured:
        assert row["step_time"] == pytest.approx(2 * SECONDS_PER_BATCH)
        assert row["tflops_per_gpu"] == pytest.approx(2 * micro_flops / row["step_time"] / 1e12, rel=1e-6)
        assert row["tokens_per_sec"] == pytest.approx(2 * BATCH * 16 / row["step_time"], rel=1e-6)


def test_losses_and_weights_are_identical_with_and_without_the_callback(tmp_path):
    with_callback, model_a = train(tmp_path / "a", callback=MFUCallback(peak_tflops=PEAK_TFLOPS))
    without, model_b = train(tmp_path / "b", callback=None)
    losses_a = [row["loss"] for row in with_callback.state.log_history if "loss" in row]
    losses_b = [row["loss"] for row in without.state.log_history if "loss" in row]
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_internal_error_is_logged_once_and_training_goes_on(tmp_path, monkeypatch, caplog, fake_meter):
    from mfu_callbacks.meter import MFUMeter

    def broken(self, *args, **kwargs):
        raise RuntimeError("deliberate failure")

    monkeypatch.setattr(MFUMeter, "end_step", broken)
    with caplog.at_level(logging.ERROR, logger="mfu_callbacks"):
        trainer, _ = train(tmp_path, callback=MFUCallback(peak_tflops=PEAK_TFLOPS))
    assert trainer.state.global_step == 6
    errors = [r for r in caplog.records if "stopped measuring MFU" in r.getMessage()]
    assert len(errors) == 1
    assert not any("mfu" in row for row in trainer.state.log_history)


TWO_RANKS_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
from transformers import Trainer, TrainingArguments
from tests.conftest import FixedLengthTokens, collate, tiny_llama
from mfu_callbacks.transformers import MFUCallback

def late_collate(rows):
    if dist.is_initialized() and dist.get_rank() == 1:
        time.sleep({delay})  # rank 1 is late with every batch
    return collate(rows)

args = TrainingArguments(output_dir={out!r}, max_steps=14, per_device_train_batch_size=4, logging_steps=13,
                         report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
callback = MFUCallback(peak_tflops=0.5, warmup_steps=1)
trainer = Trainer(model=tiny_llama(), args=args, train_dataset=FixedLengthTokens(128), data_collator=late_collate,
                  callbacks=[callback])
trainer.train()
if trainer.is_world_process_zero():
    row = next(r for r in trainer.state.log_history if "mfu" in r)
    ids = [d.id for d in callback.session.meter.diagnostics()]
    print("RESULT", json.dumps({{"row": row, "diagnoses": ids, "world": dist.get_world_size()}}))
sys.stdout.flush()
dist.barrier()
# Leave at once: gloo's teardown at interpreter exit can abort a process (SIGABRT) after its work is done.
import os
os._exit(0)
"""


@pytest.mark.multiprocess
def test_two_ranks_under_torchrun_count_both_and_show_the_wait_for_the_late_one(tmp_path):
    from pathlib import Path

    delay = 0.05
    script = tmp_path / "train.py"
    script.write_text(
        TWO_RANKS_SCRIPT.format(root=str(Path(__file__).parents[2]), out=str(tmp_path / "out"), delay=delay)
    )
    report, *_ = torchrun(script, tag="RESULT", timeout=400)
    row = report["row"]
    assert report["world"] == 2
    # Both ranks' tokens: 2 ranks x 4 rows x 16 tokens per optimizer step.
    assert row["tokens_per_sec"] == pytest.approx(2 * 4 * 16 / row["step_time"], rel=1e-6)
    assert row["tokens_per_sec_per_gpu"] == pytest.approx(row["tokens_per_sec"] / 2, rel=1e-6)
    # The Trainer gathers the batch's token count across ranks before each step, so rank 0 waits for
    # the late rank 1 there: both ranks spend the delay outside their steps, as input wait.
    assert row["step_time"] > row["step_time_max"] + 0.5 * delay
    assert row["input_wait_fraction"] > 0.5
    assert "input_bound" in report["diagnoses"]


# -- never overwrite the trainer's keys; evaluation and saves are not training -------------------------
class OwnStepTime(Trainer):
    """Logs a ``step_time`` of its own in the training rows, as TRL's GRPO and RLOO trainers do."""

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs = {**logs, "step_time": 123.0}
        super().log(logs, *args, **kwargs)


def test_a_key_the_trainer_logs_itself_keeps_its_value_and_ours_goes_beside_it(tmp_path, fake_meter):
    reporter = RecordingReporter()
    trainer, _ = train(
        tmp_path,
        callback=MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1),
        reporter=reporter,
        trainer_class=OwnStepTime,
    )
    measured = [row for row in trainer.state.log_history if "mfu" in row]
    reported = [row for row in reporter.records if "mfu" in row]
    assert len(measured) >= 2 and len(reported) == len(measured), trainer.state.log_history
    for row in [*measured, *reported]:
        assert row["step_time"] == 123.0
        assert row["mfu/step_time"] == pytest.approx(SECONDS_PER_BATCH)
        assert row["mfu"] == pytest.approx(
            BATCH * SEQ * FLOPS_PER_TOKEN / (SECONDS_PER_BATCH * PEAK_TFLOPS * 1e12)
        )


class EvaluationTakesTime(FixedLengthTokens):
    """An evaluation set whose every row moves the meter's clock on: evaluation that takes long."""

    def __init__(self, clock, size: int = 8, seconds: float = 1.0) -> None:
        super().__init__(size)
        self.clock, self.seconds = clock, seconds

    def __getitem__(self, index: int):
        self.clock.advance(self.seconds)
        return super().__getitem__(index)


class SaveTakesTime(TrainerCallback):
    """Some work at each save (a callback of the user's, run before ours), on the meter's clock."""

    def __init__(self, clock, seconds: float = 5.0) -> None:
        self.clock, self.seconds = clock, seconds

    def on_save(self, args, state, control, **kwargs):
        self.clock.advance(self.seconds)


def assert_evaluation_and_saves_left_out(callback: MFUCallback, rows: list[dict]) -> None:
    """Every step is exactly its micro-batch on the fake clock: no input wait, no ``input_bound``."""
    assert len(rows) >= 5, rows
    for row in rows:
        assert row["step_time"] == pytest.approx(SECONDS_PER_BATCH)
        assert row["input_wait_fraction"] == pytest.approx(0.0, abs=1e-9)
    assert callback.session.meter._reader.run.steps >= 10  # enough for the input_bound check to judge
    assert "input_bound" not in [d.id for d in callback.session.meter.diagnostics()]


def test_evaluation_between_steps_is_neither_step_time_nor_input_wait(tmp_path, fake_meter):
    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    trainer, _ = train(
        tmp_path,
        callback=callback,
        steps=12,
        eval_dataset=EvaluationTakesTime(fake_meter),
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=BATCH,
    )
    assert len([row for row in trainer.state.log_history if "eval_loss" in row]) == 6
    assert_evaluation_and_saves_left_out(callback, [row for row in trainer.state.log_history if "mfu" in row])


@pytest.mark.parametrize("save_steps", [2, 3], ids=["with-log", "between-logs"])
def test_a_checkpoint_save_is_neither_step_time_nor_input_wait(tmp_path, fake_meter, save_steps):
    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    trainer, _ = train(
        tmp_path,
        callback=callback,
        steps=12,
        before=(SaveTakesTime(fake_meter),),
        save_strategy="steps",
        save_steps=save_steps,
        save_only_model=True,
    )
    assert len(list(tmp_path.glob("checkpoint-*"))) == 12 // save_steps
    assert_evaluation_and_saves_left_out(callback, [row for row in trainer.state.log_history if "mfu" in row])


class SlowRows(FixedLengthTokens):
    def __getitem__(self, index: int):
        time.sleep(0.02)
        return super().__getitem__(index)


@pytest.mark.slow  # the fake-clock tests above hold the rule; this one shows it on the real clock
def test_on_the_real_clock_an_evaluation_is_not_read_as_waiting_for_input(tmp_path):
    """Evaluation (16 slow rows, about 0.3 s) every 2 steps of about 20 ms: before this was paused, the
    rows after an evaluation read input_wait_fraction 0.84-0.89 and step_time ten times a step."""
    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)
    trainer, _ = train(
        tmp_path,
        callback=callback,
        steps=8,
        eval_dataset=SlowRows(16),
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=BATCH,
    )
    rows = [row for row in trainer.state.log_history if "mfu" in row]
    assert len(rows) >= 3, trainer.state.log_history
    evaluation = 16 * 0.02 / 2  # per step, if it were counted
    for row in rows:
        assert row["input_wait_fraction"] < 0.5
        assert row["step_time"] < evaluation / 2


@pytest.mark.slow  # generation inside each step: about 5-10 s per trainer on a CPU
@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_trl_online_trainers_keep_their_own_step_time(tmp_path, monkeypatch, name):
    """GRPO and RLOO log a ``step_time`` of their own (generation included): it stays theirs. Without a
    reference model (beta 0: built from a model name otherwise, which needs the Hub)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from mfu_callbacks.testing import causal_lm, word_tokenizer

    model = causal_lm(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, attention="eager")
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    prompts = [" ".join(f"w{3 + (i * 7 + j) % 60}" for j in range(4)) for i in range(32)]
    config = getattr(trl, f"{name}Config")(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        beta=0.0,
    )
    trainer = getattr(trl, f"{name}Trainer")(
        model=model,
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=word_tokenizer(64),
        callbacks=[MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)],
    )
    own: list[float] = []
    log = Trainer.log

    def keep_own(self, logs, *args, **kwargs):  # the row as the trainer made it, before any callback ran
        if "step_time" in logs:
            own.append(logs["step_time"])
        return log(self, logs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "log", keep_own)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "step_time" in row]
    measured = [row for row in rows if "mfu" in row]
    assert len(measured) >= 2, trainer.state.log_history
    assert [row["step_time"] for row in rows] == own
    assert all(row["mfu/step_time"] > 0 for row in measured)
    # Generation is a phase of the step: its split sits beside mfu, and no trainer key is replaced.
    for row in measured:
        assert 0 < row["mfu/generation_time_fraction"] < 1
        assert row["mfu/generation_flops"] > 0 and row["mfu/generation_tokens_per_sec"] > 0
        phases = (row["mfu/training"], row["mfu/generation"])
        assert min(phases) <= row["mfu"] <= max(phases)  # the time-weighted mix of the two phases


def test_a_callback_rebuilt_from_saved_args_keeps_its_options_and_names_what_could_not_travel(caplog):
    """transformers rebuilds a stateful callback as type(callback)(**state["args"]): every JSON option
    comes back, an unknown key (from a newer version) is ignored with a warning, and the functions that
    could not be saved are named once."""
    import json
    import logging

    from mfu_callbacks.transformers import MFUCallback

    original = MFUCallback(
        peak_tflops=1.5, warmup_steps=3, log_interval=4, dtype="bf16", profile_steps=2, token_counter=dict
    )
    args = json.loads(json.dumps(original.state()["args"]))
    args["an_option_of_a_newer_version"] = 1
    with caplog.at_level(logging.WARNING):
        rebuilt = MFUCallback(**args)
    for name in ("peak_tflops", "warmup_steps", "log_interval", "dtype", "profile_steps", "prefix"):
        assert getattr(rebuilt.options, name) == getattr(original.options, name), name
    messages = [record.getMessage() for record in caplog.records]
    assert sum("an_option_of_a_newer_version" in message for message in messages) == 1
    assert sum("no token_counter" in message for message in messages) == 1
    with pytest.raises(TypeError):  # a typo of the user's own is still refused
        MFUCallback(warmup_step=3)
