"""The callbacks count the real step where the meta-device copy cannot (or counts wrong): TRL's
SFTTrainer, hand-written routing, a fused head with its own backward; every row after warm-up has MFU."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks import MFUMeter
from mfu_callbacks._torch_internals import dispatch_mode_stack
from mfu_callbacks.flops import ModelIntrospectionError
from mfu_callbacks.testing import causal_lm, make_eager, reference_step_flops, word_tokenizer
from tests.conftest import VOCAB, assert_flops, full_batch, model_truth, padded_batch
from tests.flops.test_observe import fused_head_forward, llama, tiny_moe_lm, unfused_forward


def run_loop(model: nn.Module, batches: list[dict], forward, **options: Any) -> MFUMeter:
    """A plain training loop with the meter, as README shows it."""
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, forward=forward, **options)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in batches:
        meter.start_step(batch)
        forward(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end_step()
    return meter


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    output = model(**batch)
    return output.loss if hasattr(output, "loss") else output


def test_a_model_the_copy_cannot_trace_is_counted_from_its_real_step(caplog) -> None:
    model = tiny_moe_lm()
    batches = [full_batch(2, 16), full_batch(3, 24), full_batch(2, 16)]
    with caplog.at_level(logging.INFO, logger="mfu_callbacks"):
        meter = run_loop(model, batches, loss_of)
        meter.metrics()
    assert "counted on a real training step" in caplog.text
    flops = meter.run_flops()
    assert flops is not None
    truth = sum(reference_step_flops(model, batch) for batch in batches[1:])  # the first was observed
    assert_flops(flops.model_flops, truth, "model FLOPs of the measured steps")


def test_where_the_copy_miscounts_a_custom_backward_the_real_step_is_used(caplog) -> None:
    model = llama()
    batches = [full_batch(2, 17), full_batch(3, 25)]
    with caplog.at_level(logging.INFO, logger="mfu_callbacks"):
        meter = run_loop(model, batches, fused_head_forward)
        meter.metrics()
    assert "the real step's count is used" in caplog.text and "head" in caplog.text
    flops = meter.run_flops()
    assert flops is not None
    assert_flops(flops.model_flops, reference_step_flops(model, batches[1], unfused_forward), "model FLOPs")


def test_where_the_copy_agrees_it_is_kept(caplog) -> None:
    model = llama()
    with caplog.at_level(logging.INFO, logger="mfu_callbacks"):
        meter = run_loop(model, [padded_batch([5, 12]), padded_batch([7, 3, 16])], loss_of)
        meter.metrics()
    assert "agree with the copy's" in caplog.text
    assert meter.engine is not None and "meta-device replica" in meter.engine.description


def test_real_step_off_never_watches_and_only_skips_the_copy() -> None:
    model = tiny_moe_lm()
    batches = [full_batch(2, 16), full_batch(2, 16)]
    with pytest.raises(ModelIntrospectionError, match="could not trace"):
        run_loop(model, batches, loss_of, real_step="off")
    only = run_loop(llama(), batches, loss_of, real_step="only")
    only.metrics()
    assert only.engine is not None and "real training step" in only.engine.description


def test_a_pass_without_grad_before_the_training_forward_is_counted_in_every_step() -> None:
    """KTO's way: a forward of the trained model without grad (its KL pass) opens the step, before the
    training micro-batch: the observation covers it, and later steps count it by their batch."""
    model = llama()
    batches = [full_batch(2, 16, seed=0), full_batch(3, 24, seed=1), full_batch(2, 16, seed=2)]
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, real_step="only")
    for batch in batches:
        meter.start_step()
        with torch.no_grad():
            meter.add_forward(batch)
            model(**batch)
        meter.add_batch(batch)
        model(**batch).loss.backward()
        model.zero_grad()
        meter.end_step()
    meter.metrics()
    engine = meter.engine
    assert engine is not None
    for batch in batches:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**batch)
        assert_flops(
            engine.estimate(batch).model_flops,
            model_truth(model, batch) + counter.get_total_flops(),
            "the training step and the pass without grad",
        )


def test_a_bad_real_step_option_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="real_step must be one of"):
        MFUMeter(nn.Linear(2, 2), peak_tflops=1.0, real_step="sometimes")


def test_losses_and_weights_are_identical_when_the_step_is_observed() -> None:
    batches = [full_batch(2, 16, seed=s) for s in range(3)]
    trained = []
    for watched in (True, False):
        model = tiny_moe_lm()
        losses = []
        meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, real_step="only") if watched else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in batches:
            if meter is not None:
                meter.start_step(batch)
            loss = loss_of(model, batch)
            loss.backward()
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
            if meter is not None:
                meter.end_step()
        trained.append((losses, model.state_dict()))
    (losses_a, weights_a), (losses_b, weights_b) = trained
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# -- a step that raises while it is observed -------------------------------------------------------
# Where the first step raises: inside the model's forward, inside the backward, after the backward,
# in the optimizer's step. The observer leaves before the error reaches the loop.
LEAVES_WITH_THE_ERROR = ("forward", "backward", "after_backward", "optimizer_step")
# Errors raised by the loop itself between start_step and the forward, or between the forward and
# the backward, pass through nothing of the meter's or the model's: the meter's next call leaves.
LEAVES_AT_THE_NEXT_CALL = ("before_forward", "before_backward")


def ours_left(model: nn.Module) -> list[str]:
    """What of mfu_callbacks is still active: dispatch modes, hooks on the model's modules, a forward
    of the model's own."""
    left = [type(mode).__name__ for mode in dispatch_mode_stack()]
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            for hook in getattr(module, kind).values():
                if getattr(hook, "__module__", "").startswith("mfu_callbacks"):
                    left.append(f"{name or 'model'}.{kind}: {hook.__qualname__}")
    if "forward" in vars(model):
        left.append("model.forward")
    return left


def interrupted_training(
    point: str, error: type[BaseException], *, metered: bool
) -> tuple[list[list[str]], MFUMeter | None, dict]:
    """Four steps of a plain loop on a tiny model, reading the meter after each; the first raises
    ``error`` at ``point``, the loop catches it and goes on. What of ours was left when the error
    reached the loop and at the end, the meter, and the trained weights."""
    model = make_eager(causal_lm(vocab=VOCAB))
    batches = [full_batch(2, 16, seed=seed) for seed in range(4)]
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, real_step="only") if metered else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    armed = [True]

    def fire(*_: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise error("injected")

    def fire_in_backward(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.register_hook(fire)  # on the layer's output's gradient: the backward is half done

    handles = []
    layer = model.model.layers[1]
    if point == "forward":
        handles.append(layer.register_forward_pre_hook(fire))
    elif point == "backward":
        handles.append(layer.register_forward_hook(fire_in_backward))
    elif point == "optimizer_step":
        handles.append(optimizer.register_step_pre_hook(fire))
    left = []
    for index, batch in enumerate(batches):
        if meter is not None:
            meter.start_step(batch)
        try:
            if point == "before_forward":
                fire()
            loss = model(**batch).loss
            if point == "before_backward":
                fire()
            loss.backward()
            if point == "after_backward":
                fire()
            optimizer.step()
        except error:
            left.append(ours_left(model))
        finally:
            optimizer.zero_grad()
            if meter is not None:
                meter.end_step()
                meter.metrics()
        if index == 0:
            for handle in handles:
                handle.remove()
    left.append(ours_left(model))
    return left, meter, model.state_dict()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError], ids=["interrupt", "error"])
@pytest.mark.parametrize("point", LEAVES_WITH_THE_ERROR + LEAVES_AT_THE_NEXT_CALL)
def test_a_step_that_raises_while_observed_leaves_nothing_behind_and_measuring_goes_on(point, error) -> None:
    (when_raised, at_the_end), meter, weights = interrupted_training(point, error, metered=True)
    if point in LEAVES_WITH_THE_ERROR:
        assert when_raised == []
    assert at_the_end == []
    assert meter is not None and meter.engine is not None  # the next step was observed
    assert meter.summary()["mfu"] > 0  # and the two after it measured
    _, _, unmetered = interrupted_training(point, error, metered=False)
    assert all(torch.equal(weights[key], unmetered[key]) for key in weights)


# -- TRL ------------------------------------------------------------------------------------------
TRL_SETUPS = {
    "full": {},
    "lora": {"lora": True},
    "packing": {"packing": True},
    "padding_free": {"padding_free": True, "max_length": None},
    "lora_packing_checkpointing": {"lora": True, "packing": True, "gradient_checkpointing": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(TRL_SETUPS))
def test_trl_sft_trainer_logs_mfu_in_every_row_with_default_options(tmp_path, setup: str) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from mfu_callbacks.transformers import MFUCallback

    options = dict(TRL_SETUPS[setup])
    lora = options.pop("lora", False)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 30, (48,), generator=generator).tolist()
    data = Dataset.from_list(
        [{"input_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()} for n in lengths]
    )
    model = llama()
    steps: list[
        list[dict]
    ] = []  # the micro-batches of each optimizer step, as TRL's training forward got them

    def keep(module, args, kwargs) -> None:
        if kwargs.get("fused_lm_head"):  # not the truth's own forwards below
            while len(steps) <= trainer.state.global_step:
                steps.append([])
            steps[-1].append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    model.register_forward_pre_hook(keep, with_kwargs=True)
    callback = MFUCallback(peak_tflops=1.0, warmup_steps=1)
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=options.pop("max_length", 64),
        gradient_checkpointing=options.pop("gradient_checkpointing", False), **options,
    )  # fmt: skip
    peft_config = (
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if lora else None
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=word_tokenizer(VOCAB), callbacks=[callback],
        peft_config=peft_config,
    )  # fmt: skip
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == len(steps) == 6
    assert all("mfu" in row for row in rows[2:]), rows  # warm-up, then the step that built the engine
    # Every row's logged model FLOPs against its own step's truth (checkpointing off, no gradient forced
    # onto the embeddings: neither is model work). TRL's fused head scores every position but the last of
    # a row, the plain forward of the truth every position: one token's head per row apart, within 1% here.
    for row, batches in list(zip(rows, steps))[2:]:
        truth = sum(model_truth(trainer.model, batch) for batch in batches)
        assert_flops(round(row["tflops_per_gpu"] * 1e12 * row["step_time"]), truth, "model FLOPs", rel=0.01)


# -- the integrations ---------------------------------------------------------------------------------
def _moe_rows() -> list[dict]:
    return [full_batch(2, 16, seed=seed) for seed in range(6)]


def test_lightning_counts_a_model_the_copy_cannot_trace_from_its_real_step(tmp_path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from mfu_callbacks.lightning import MFUCallback

    class MoEModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_moe_lm()

        def training_step(self, batch, batch_idx):
            return self.model(**batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = MFUCallback(peak_tflops=1.0, warmup_steps=1, log_interval=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, logger=False, callbacks=[callback], default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = MoEModule()
    trainer.fit(module, DataLoader(_moe_rows(), batch_size=None))
    flops = callback.session.meter.run_flops()
    assert flops is not None and callback.summary.get("mfu", 0) > 0
    measured = flops.model_flops / reference_step_flops(module.model, _moe_rows()[0])
    assert measured == pytest.approx(round(measured)) and round(measured) >= 3  # whole steps, exactly


def test_accelerate_counts_a_model_the_copy_cannot_trace_from_its_real_step() -> None:
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(cpu=True)
    model = tiny_moe_lm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    tracker = MFUTracker(accelerator, model, peak_tflops=1.0, warmup_steps=1, log_interval=2)
    for batch in _moe_rows():
        loss = model(**batch)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.end_training()
    flops = tracker.session.meter.run_flops()
    assert flops is not None
    measured = flops.model_flops / reference_step_flops(accelerator.unwrap_model(model), _moe_rows()[0])
    assert measured == pytest.approx(round(measured)) and round(measured) >= 3


def test_an_observed_step_without_a_backward_is_observed_again_on_the_next() -> None:
    model = tiny_moe_lm()
    batches = _moe_rows()
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, real_step="only")
    meter.start_step(batches[0])
    with torch.no_grad():
        model(**batches[0])  # a step without a backward: nothing to fit
    meter.end_step()
    assert meter.metrics() == {} and meter.engine is None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in batches[1:]:
        meter.start_step(batch)
        model(**batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end_step()
    assert "mfu" in meter.metrics()
    flops = meter.run_flops()
    assert flops is not None  # the second step was observed (left out); the rest were measured
    assert_flops(flops.model_flops, 4 * reference_step_flops(model, batches[0]), "model FLOPs")


def test_a_sharded_model_is_counted_from_the_copy_without_watching_the_step(caplog) -> None:
    model = llama()
    next(model.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with caplog.at_level(logging.INFO, logger="mfu_callbacks"):
        meter = run_loop(model, [padded_batch([5, 12]), padded_batch([7, 3, 16])], loss_of)
        meter.metrics()
    assert "agree with the copy's" not in caplog.text and "real step" not in caplog.text
    assert meter.engine is not None and "meta-device replica" in meter.engine.description
