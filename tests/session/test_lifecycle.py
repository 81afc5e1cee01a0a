"""The callbacks across a run's life: interrupted and repeated runs, resuming from checkpoints,
exact optimizer steps, positional inputs, run summaries on disk, and training left unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mfu_callbacks.runs.summary import RunSummary
from tests.conftest import FixedLengthTokens, collate, tiny_llama

PEAK_TFLOPS = 0.5

BATCH = 4


def our_forward_hooks(model: nn.Module) -> int:
    return sum(
        "before_forward" in getattr(hook, "__qualname__", "") for hook in model._forward_pre_hooks.values()
    )


# -- Hugging Face Trainer ------------------------------------------------------------------------------
def hf_trainer(
    tmp_path,
    callback,
    *,
    steps: int = 6,
    save_steps: int | None = None,
    callbacks=(),
    seed: int = 0,
    model: nn.Module | None = None,
    **arguments,
):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        data_seed=0,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        dataloader_num_workers=0,
        **arguments,
    )
    model = model if model is not None else tiny_llama()
    return Trainer(
        model=model,
        args=args,
        train_dataset=FixedLengthTokens(64),
        data_collator=collate,
        callbacks=[*callbacks, *([callback] if callback is not None else [])],
    )


class Interrupt(Exception):
    pass


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_hf_a_train_after_an_interrupted_one_counts_each_batch_once(tmp_path):
    from transformers import TrainerCallback

    from mfu_callbacks.transformers import MFUCallback

    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Interrupt

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    trainer = hf_trainer(tmp_path, callback, callbacks=[StopAtStep3()])
    with pytest.raises(Interrupt):
        trainer.train()
    assert our_forward_hooks(trainer.model) == 1  # left behind by the interrupted run
    clean = hf_trainer(tmp_path / "clean", MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0))
    clean.train()
    trainer.callback_handler.pop_callback(StopAtStep3)
    trainer.train()
    assert our_forward_hooks(trainer.model) == 0
    flops = callback.session.meter.run_flops().model_flops
    assert flops == clean.callback_handler.callbacks[0].session.meter.run_flops().model_flops > 0


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_hf_resumed_run_continues_the_summary_of_the_first(tmp_path):
    from mfu_callbacks.transformers import MFUCallback

    first = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    hf_trainer(tmp_path, first, save_steps=3).train()
    resumed = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    hf_trainer(tmp_path, resumed, save_steps=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    fresh = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    hf_trainer(tmp_path / "fresh", fresh, steps=3).train()
    # Steps 1-3 of the first run (the first built the engine: 2 measured) continue in the resumed run's
    # totals, beside its own steps 4-6 (2 measured): the run summary covers 4 measured steps.
    fresh_steps = fresh.session.meter._reader.run.steps
    assert fresh_steps == 2
    assert resumed.session.meter._reader.run.steps == 2 * fresh_steps
    assert resumed.session.meter.run_flops().model_flops == 2 * fresh.session.meter.run_flops().model_flops
    assert resumed.summary["mfu"] > 0
    # The run summary holds the windows of both runs by global step: the first run's up to the
    # checkpoint it resumed from, then the resumed run's (its first step builds the engine again).
    written = RunSummary.read(tmp_path)
    assert [window["step"] for window in written.windows] == [2, 3, 5, 6]


@pytest.mark.slow  # two Trainer runs with checkpoints
def test_hf_the_callback_the_user_holds_gets_the_summary_when_the_trainer_rebuilds_it(tmp_path):
    from mfu_callbacks.transformers import MFUCallback

    hf_trainer(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0), save_steps=3).train()
    mine = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    trainer = hf_trainer(tmp_path, mine, save_steps=3, restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    (running,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, MFUCallback)]
    assert running is not mine  # the Trainer swapped in a callback built from the checkpoint
    assert running.summary["mfu"] > 0
    assert mine.summary == running.summary


def test_hf_writes_a_run_summary_beside_its_outputs(tmp_path):
    from mfu_callbacks.runs.summary import RunSummary
    from mfu_callbacks.transformers import MFUCallback

    hf_trainer(tmp_path, MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1)).train()
    summary = RunSummary.read(tmp_path / "mfu_summary.json")
    assert [window["step"] for window in summary.windows] == [2, 3, 4, 5, 6]  # step 1 is warm-up
    assert all("mfu" in window["metrics"] for window in summary.windows)
    assert summary.setup["model"]["architecture"] == "LlamaForCausalLM"
    assert summary.setup["peak_tflops"] == PEAK_TFLOPS


def test_hf_writes_the_run_summary_where_the_option_says(tmp_path):
    from mfu_callbacks.runs.summary import RunSummary
    from mfu_callbacks.transformers import MFUCallback

    elsewhere = tmp_path / "summaries"
    hf_trainer(
        tmp_path / "out", MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=1, summary_dir=str(elsewhere))
    ).train()
    assert not (tmp_path / "out" / "mfu_summary.json").exists()
    assert len(RunSummary.read(elsewhere / "mfu_summary.json").windows) == 5


class StochasticDepthLlama(nn.Module):
    """A tiny Llama whose forward draws from torch's CPU generator (stochastic depth, layerdrop)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()

    def forward(self, input_ids, attention_mask=None, labels=None):
        if self.training and float(torch.rand(())) < 0.3:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        output = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        output.loss = output.loss * (1.0 + float(torch.rand(())))  # noise from the same generator
        return output


def bart_with_layerdrop() -> nn.Module:
    """BART's layerdrop skips each layer with probability 0.5, drawn with torch.rand on the CPU generator."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        encoder_layerdrop=0.5,
        decoder_layerdrop=0.5,
    )
    return BartForConditionalGeneration(config)


@pytest.mark.parametrize(
    "build",
    [StochasticDepthLlama, pytest.param(bart_with_layerdrop, marks=pytest.mark.slow)],
    ids=["stochastic_depth", "bart_layerdrop"],
)
def test_hf_training_is_bit_identical_with_and_without_the_callback(tmp_path, build):
    from transformers import TrainerCallback

    from mfu_callbacks.transformers import MFUCallback

    class Losses(TrainerCallback):
        def __init__(self):
            self.values = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(logs["loss"])

    def run(callback):
        losses = Losses()
        torch.manual_seed(0)
        trainer = hf_trainer(tmp_path, callback, callbacks=[losses], model=build())
        trainer.train()
        return losses.values, [p.detach().clone() for p in trainer.model.parameters()]

    losses_without, weights_without = run(None)
    losses_with, weights_with = run(MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0))
    assert losses_with == losses_without
    assert all(torch.equal(a, b) for a, b in zip(weights_with, weights_without))


# -- Lightning ---------------------------------------------------------------------------------------------
class Rows(IterableDataset):
    """A stream of rows whose length the Trainer cannot know (num_training_batches is inf)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __iter__(self):
        data = FixedLengthTokens(self.rows)
        return iter(data[i] for i in range(self.rows))


def lightning_module(noise: bool = False):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            if noise:  # noise drawn on the module's device, from the global generator
                loss = loss * (1.0 + torch.randn((), device=self.device) * 0.1)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    return Module()


def lightning_trainer(tmp_path, callbacks, **options):
    import lightning as L

    options = {
        "max_epochs": 1,
        "log_every_n_steps": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **options,
    }
    return L.Trainer(default_root_dir=str(tmp_path), callbacks=callbacks, **options)


def test_lightning_follows_every_optimizer_step_of_an_iterable_dataset_under_accumulation(tmp_path):
    from mfu_callbacks.lightning import MFUCallback

    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    trainer = lightning_trainer(tmp_path, [callback], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(lightning_module(), DataLoader(Rows(9 * BATCH), batch_size=BATCH, collate_fn=collate))
    assert trainer.global_step == 10  # 5 optimizer steps per epoch of 9 batches
    assert callback.session.optimizer_steps == trainer.global_step
    assert not callback.session.step_open


def test_lightning_resumed_fit_continues_the_summary_of_the_first(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mfu_callbacks.lightning import MFUCallback

    loader = DataLoader(FixedLengthTokens(6 * BATCH), batch_size=BATCH, collate_fn=collate)
    first = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    lightning_trainer(tmp_path, [first, saver], max_steps=3, enable_checkpointing=True).fit(
        lightning_module(), loader
    )
    resumed = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    checkpoint = next((tmp_path / "ckpt").glob("*.ckpt"))
    lightning_trainer(tmp_path, [resumed], max_steps=6).fit(
        lightning_module(), loader, ckpt_path=str(checkpoint)
    )
    first_steps = first.session.meter._reader.run.steps
    assert first_steps == 2  # the first step builds the engine
    assert resumed.session.meter._reader.run.steps == 2 * first_steps
    assert resumed.summary["mfu"] > 0


def test_lightning_a_second_fit_with_the_same_callback_starts_clean(tmp_path):
    from mfu_callbacks.lightning import MFUCallback

    loader = DataLoader(FixedLengthTokens(4 * BATCH), batch_size=BATCH, collate_fn=collate)
    callback = MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)
    lightning_trainer(tmp_path, [callback], max_steps=2).fit(lightning_module(), loader)
    first = callback.session.meter
    lightning_trainer(tmp_path, [callback], max_steps=4).fit(lightning_module(), loader)
    assert callback.session.meter is not first
    assert callback.session.meter._reader.run.steps == 3  # four steps, the first built the engine


def test_lightning_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    from mfu_callbacks.lightning import MFUCallback

    def run(callbacks):
        torch.manual_seed(0)
        module = lightning_module(noise=True)
        loader = DataLoader(FixedLengthTokens(6 * BATCH), batch_size=BATCH, collate_fn=collate)
        lightning_trainer(tmp_path, callbacks, max_steps=6).fit(module, loader)
        return [p.detach().clone() for p in module.parameters()]

    without = run([])
    with_callback = run([MFUCallback(peak_tflops=PEAK_TFLOPS, warmup_steps=0)])
    assert all(torch.equal(a, b) for a, b in zip(with_callback, without))


# -- Accelerate ------------------------------------------------------------------------------------------
def test_accelerate_positional_inputs_are_counted(tmp_path):
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    tracker = MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=0, log_interval=3)
    batch = collate([FixedLengthTokens(BATCH)[i] for i in range(BATCH)])
    for _ in range(4):
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert tracker.latest["train/tokens_per_sec"] > 0
    assert (
        tracker.session.meter.run_flops().tokens == 2 * BATCH * 16
    )  # steps 2 and 3 (the first built the engine)


def test_accelerate_save_and_load_state_continue_the_run_totals(tmp_path):
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    def loop(tracker, model, optimizer, accelerator, steps):
        batch = collate([FixedLengthTokens(BATCH)[i] for i in range(BATCH)])
        for _ in range(steps):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
        tracker.metrics()

    def setup():
        accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
        model = tiny_llama()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-2))
        tracker = MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=0, log_interval=100)
        return accelerator, model, optimizer, tracker

    accelerator, model, optimizer, first = setup()
    loop(first, model, optimizer, accelerator, 3)
    accelerator.save_state(str(tmp_path / "state"))
    first.close()
    accelerator, model, optimizer, resumed = setup()
    accelerator.load_state(str(tmp_path / "state"))
    loop(resumed, model, optimizer, accelerator, 3)
    assert first.session.meter._reader.run.steps == 2
    assert resumed.session.meter._reader.run.steps == 4
    resumed.close()
    written = RunSummary.read(tmp_path)
    assert written.windows, "the run summary is written beside the project's outputs"


def accelerate_losses(
    model: nn.Module, *, tracker_before_prepare: bool = False, with_tracker: bool = True, steps: int = 6
) -> tuple[list[float], list[torch.Tensor], object]:
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    tracker = None
    if with_tracker and tracker_before_prepare:
        tracker = MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=0, log_interval=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    if with_tracker and not tracker_before_prepare:
        tracker = MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=0, log_interval=2)
    batch = collate([FixedLengthTokens(BATCH)[i] for i in range(BATCH)])
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if tracker is not None:
        tracker.close()
    return losses, [p.detach().clone() for p in model.parameters()], tracker


def test_accelerate_training_is_bit_identical_with_and_without_the_tracker():
    torch.manual_seed(0)
    losses_without, weights_without, _ = accelerate_losses(StochasticDepthLlama(), with_tracker=False)
    torch.manual_seed(0)
    losses_with, weights_with, _ = accelerate_losses(StochasticDepthLlama())
    assert losses_with == losses_without
    assert all(torch.equal(a, b) for a, b in zip(weights_with, weights_without))


def test_accelerate_a_tracker_made_before_prepare_sees_every_step():
    _, _, tracker = accelerate_losses(tiny_llama(), tracker_before_prepare=True)
    assert tracker.session.optimizer_steps == 6
    assert tracker.latest["train/tokens_per_sec"] > 0
