"""Every method that framework code calls into runs its whole body behind the guard: a failure injected
into each registered entry point leaves training bit-identical and is logged once. The registry
(``_guard.ENTRY_POINTS``) is checked against the callbacks' hook methods, so a new one cannot be forgotten."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader

import mfu_callbacks.accelerate
import mfu_callbacks.lightning
import mfu_callbacks.transformers
from mfu_callbacks import _forward_watch
from mfu_callbacks._guard import ENTRY_POINTS
from tests.conftest import FixedLengthTokens, collate, tiny_llama

OPTIONS = {"peak_tflops": 0.5, "warmup_steps": 0}


def test_every_framework_hook_of_the_callbacks_is_a_registered_entry_point():
    hooks = {
        mfu_callbacks.transformers.MFUCallback: [
            n for n in vars(mfu_callbacks.transformers.MFUCallback) if n.startswith("on_")
        ]
        + ["state"],
        mfu_callbacks.transformers._AfterTheFlow: [
            n for n in vars(mfu_callbacks.transformers._AfterTheFlow) if n.startswith("on_")
        ],
        mfu_callbacks.lightning.MFUCallback: [
            n for n in vars(mfu_callbacks.lightning.MFUCallback) if n.startswith("on_")
        ]
        + ["state_dict", "load_state_dict"],
        mfu_callbacks.accelerate.MFUTracker: [
            "_after_optimizer_step",
            "_with_pending",
            "finish",
            "_save_state",
            "_load_state",
        ],
        _forward_watch.ForwardWatch: [
            "_before_forward",
            "_before_other_forward",
            "_generation_begins",
            "_generation_ends",
        ],
    }
    for owner, names in hooks.items():
        for name in names:
            assert getattr(getattr(owner, name), "__entry_point__", None) in ENTRY_POINTS, (owner, name)


def _hf(callback):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir="/tmp/mfu-entry-points",
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=FixedLengthTokens(16),
        data_collator=collate,
        callbacks=[callback] if callback else [],
    )
    trainer.train()
    return [p.detach().clone() for p in trainer.model.parameters()]


def _lightning(callback):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[callback] if callback else [],
    ).fit(module, DataLoader(FixedLengthTokens(12), batch_size=4, collate_fn=collate))
    return [p.detach().clone() for p in module.parameters()]


def _accelerate(with_tracker):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(FixedLengthTokens(12), batch_size=4, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if with_tracker:
        mfu_callbacks.accelerate.MFUTracker(accelerator, model, log_interval=1, **OPTIONS)
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": loss.item()}, step=step)
    accelerator.end_training()
    return [p.detach().clone() for p in model.parameters()]


def _run(name):
    if name.startswith("mfu_callbacks.transformers."):
        return _hf(None), lambda: _hf(mfu_callbacks.transformers.MFUCallback(**OPTIONS))
    if name.startswith("mfu_callbacks.lightning."):
        return _lightning(None), lambda: _lightning(mfu_callbacks.lightning.MFUCallback(**OPTIONS))
    return _accelerate(False), lambda: _accelerate(True)


@pytest.mark.slow  # a short training run per entry point: the registry test above stays in the unit tier
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_a_failure_in_any_entry_point_leaves_training_bit_identical_and_is_logged_once(
    name, monkeypatch, caplog
):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError(f"injected into {name}")

    plain, with_callback = _run(name)
    monkeypatch.setitem(ENTRY_POINTS, name, failing)
    with caplog.at_level(logging.ERROR, logger="mfu_callbacks"):
        weights = with_callback()
    assert all(torch.equal(a, b) for a, b in zip(weights, plain))
    logged = [r for r in caplog.records if r.name == "mfu_callbacks" and r.levelno >= logging.ERROR]
    assert len(logged) == (1 if calls else 0), [r.getMessage() for r in logged]


@pytest.mark.parametrize("where", ["_call_as_batch", "judge"])
def test_a_failure_in_the_forward_hook_binding_or_the_status_never_reaches_training(
    where, monkeypatch, caplog
):
    from mfu_callbacks import _status

    plain = _accelerate(False)

    def failing(*args, **kwargs):
        raise RuntimeError(f"injected into {where}")

    monkeypatch.setattr(_forward_watch if where == "_call_as_batch" else _status, where, failing)
    with caplog.at_level(logging.ERROR, logger="mfu_callbacks"):
        weights = _accelerate(True)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain))
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
