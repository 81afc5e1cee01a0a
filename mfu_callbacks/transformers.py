"""MFU for the Hugging Face ``Trainer`` (and trainers built on it, such as TRL's ``SFTTrainer``).

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MFUCallback()])

The Trainer hands callbacks no batch, so the callback watches the model's forward calls: a
forward pre-hook sees each training micro-batch's inputs (evaluation runs without gradients and
is ignored). ``on_step_begin``/``on_step_end`` bracket one optimizer step, all its micro-batches
included. The metrics go into the same ``logs`` dict as ``loss``: the callback moves itself ahead
of the reporting callbacks (W&B, TensorBoard, ...) so they log MFU in the same record, and it adds
the metrics to ``state.log_history`` too.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._options import MFUOptions
from ._session import MeterSession
from .precision import dtype_from_hf_args


class MFUCallback(TrainerCallback):
    """Logs ``mfu``, ``hfu``, ``tflops_per_gpu``, ``tokens_per_sec`` ... beside ``loss``.

    Options are those of :class:`~mfu_callbacks._options.MFUOptions`; ``prefix`` defaults to ""
    because the Trainer's reporting callbacks add ``train/`` themselves.
    """

    def __init__(self, **options: Any) -> None:
        options.setdefault("prefix", "")
        self.options = MFUOptions(**options)
        self.session = MeterSession(
            self.options,
            "mfu_callbacks.transformers.MFUCallback",
            wandb_prefix="train/" + self.options.prefix,  # the Trainer's WandbCallback adds "train/"
            wandb_step_metric="train/global_step",
        )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self.session.guard.run(self._move_ahead_of_reporters)
        if model is None:
            return
        self.session.attach(model, dtype=dtype_from_hf_args(bool(args.bf16), bool(args.fp16)))
        self.session.watch_forward(model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.session.begin_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.session.end_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.session.due(True):
            return
        metrics = self.session.read()
        if not metrics:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.session.unwatch()
        summary = self.session.finish()
        if summary:
            state.mfu_summary = summary  # the run's means, for whoever holds the trainer

    def _move_ahead_of_reporters(self) -> None:
        """Run this callback's ``on_log`` first, so reporters log MFU in the loss's record.

        The Trainer puts user callbacks after its reporting callbacks; the handler that calls us is
        found on the call stack (it is the ``self`` of the calling frame).
        """
        frame = inspect.currentframe()
        while frame is not None:
            handler = frame.f_locals.get("self")
            callbacks = getattr(handler, "callbacks", None)
            if type(handler).__name__ == "CallbackHandler" and isinstance(callbacks, list) and self in callbacks:
                callbacks.remove(self)
                callbacks.insert(0, self)
                return
            frame = frame.f_back
