"""MFU for the Hugging Face ``Trainer`` (and trainers built on it, such as TRL's ``SFTTrainer``).

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MFUCallback()])

The Trainer hands callbacks no batch, so the callback watches the model's forward calls: a
forward pre-hook sees each training micro-batch's inputs (evaluation runs without gradients and
is ignored). ``on_step_begin``/``on_step_end`` bracket one optimizer step, all its micro-batches
included. The metrics go into the same ``logs`` dict as ``loss``: the callback moves itself to the
front of the Trainer's callback list, ahead of the reporting callbacks (W&B, TensorBoard, ...), so
they log MFU in the same record; the same record in ``state.log_history`` (what the Trainer saves
to ``trainer_state.json``) gets them too. When training ends, ``summary`` holds the run's means.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, cast

from ._extras import missing_extra

try:
    from transformers import (
        DefaultFlowCallback,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_callback import ExportableState
    from transformers.utils import logging as transformers_logging
except ImportError as error:
    raise missing_extra(error, "mfu_callbacks.transformers", "transformers") from error

from ._options import MFUOptions
from ._session import MeterSession
from .precision import dtype_from_hf_args

logger = logging.getLogger("mfu_callbacks")
# Under the "transformers" logger: what Trainer users see, at the verbosity they set for the Trainer.
trainer_logger = transformers_logging.get_logger("transformers.mfu_callbacks")


class MFUCallback(TrainerCallback, ExportableState):
    """Logs ``mfu``, ``hfu``, ``tflops_per_gpu``, ``tokens_per_sec`` ... beside ``loss``.

    Options are those of :class:`~mfu_callbacks._options.MFUOptions`; ``prefix`` defaults to ""
    because the Trainer's reporting callbacks add ``train/`` themselves. When training ends,
    ``summary`` holds the run's means (after warm-up).
    """

    def __init__(self, **options: Any) -> None:
        options.setdefault("prefix", "")
        self.options = MFUOptions(**options)
        self.session = MeterSession(
            self.options,
            "mfu_callbacks.transformers.MFUCallback",
            wandb_prefix="train/" + self.options.prefix,  # the Trainer's WandbCallback adds "train/"
            wandb_step_metric="train/global_step",
            warn=trainer_logger.warning,
        )
        self.summary: dict[str, float] = {}
        self.mfu_state: dict[str, Any] | None = None  # set by the Trainer when it restores callback states

    def state(self) -> dict[str, Any]:
        """What the Trainer saves in a checkpoint (``ExportableState``): the options that can be
        written as JSON, and the meter's run totals, so a resumed run's summary continues this one."""
        return {"args": _json_options(self.options), "attributes": {"mfu_state": self.session.state_dict()}}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self.session.start_run()  # a second train(), or one after an interrupted run, starts clean
        if state.global_step > 0:  # resuming from a checkpoint
            self.session.continue_from_step(state.global_step)
            self.session.load_state_dict(self.mfu_state or _saved_state(state, type(self).__name__))
        self.mfu_state = None
        self.session.write_summary_to(args.output_dir)
        if self.session.guard.run(move_to_front_of_callback_lists, self) is False:
            logger.warning(
                "mfu_callbacks: could not find the Trainer's callback list to run MFUCallback ahead of the "
                "reporting callbacks; MFU reaches only the callbacks after it (and state.log_history)"
            )
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
        logs.update(metrics)  # what the callbacks after this one (the reporters) log
        add_to_saved_log_record(state, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.summary = self.session.finish()


def move_to_front_of_callback_lists(callback: TrainerCallback) -> bool:
    """Put ``callback`` first in the Trainer's callback list, so that its ``on_log`` runs before the
    reporting callbacks'; False when no such list is found.

    Callbacks get no reference to the Trainer or its ``CallbackHandler``. The handler's list is the
    one list that refers to ``callback`` and also holds the ``DefaultFlowCallback`` every Trainer
    installs; ``gc.get_referrers`` finds it (one scan of the tracked objects, once per ``train()``).
    Moving an element to the front while the handler iterates over the list (it calls
    ``on_train_begin`` from a loop over it) leaves every later callback called once, in order.
    """
    found = False
    for referrer in gc.get_referrers(callback):
        if (
            type(referrer) is list
            and any(item is callback for item in referrer)
            and any(isinstance(item, DefaultFlowCallback) for item in referrer)
        ):
            index = next(i for i, item in enumerate(referrer) if item is callback)
            referrer.insert(0, referrer.pop(index))
            found = True
    return found


def add_to_saved_log_record(state: TrainerState, metrics: dict[str, float]) -> None:
    """Add ``metrics`` to the record ``Trainer.log`` has just appended to ``state.log_history``.

    ``Trainer.log`` appends a copy of ``logs`` (plus ``step``) before it calls ``on_log``, so what
    the reporters get and what ``trainer_state.json`` keeps (read by ``mfu-callbacks plot``) only
    agree if both are given the metrics.
    """
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def _json_options(options: MFUOptions) -> dict[str, Any]:
    """The options a checkpoint can hold as JSON (functions such as ``token_counter`` cannot be)."""
    values = {
        name: getattr(options, name)
        for name in ("peak_tflops", "warmup_steps", "log_interval", "prefix", "report", "real_step")
    }
    values["silence_diagnostics"] = list(options.silence_diagnostics)
    if isinstance(options.dtype, str):
        values["dtype"] = options.dtype
    if options.summary_dir is not None:
        values["summary_dir"] = str(options.summary_dir)
    return values


def _saved_state(state: TrainerState, name: str) -> dict[str, Any]:
    """This callback's saved meter state in a resumed ``TrainerState`` (``stateful_callbacks``)."""
    # Annotated as the list of callbacks TrainerState is given; its __post_init__ turns that into a dict.
    callbacks = cast("dict[str, Any] | None", state.stateful_callbacks)
    saved = (callbacks or {}).get(name)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
    return attributes.get("mfu_state") or {}
