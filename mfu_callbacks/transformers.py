"""MFU for the Hugging Face ``Trainer`` (and trainers built on it, such as TRL's ``SFTTrainer``).

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MFUCallback()])

The Trainer hands callbacks no batch, so the callback watches the model's forward calls: a
forward pre-hook sees each training micro-batch's inputs (evaluation runs without gradients and
is ignored). ``on_step_begin``/``on_step_end`` bracket one optimizer step, all its micro-batches
included. The metrics go into the same ``logs`` dict as ``loss``: the callback moves itself to the
front of the Trainer's callback list, ahead of the reporting callbacks (W&B, TensorBoard, ...), so
they log MFU in the same record; the same record in ``state.log_history`` (what the Trainer saves
to ``trainer_state.json``) gets them too. A key the trainer put in the record itself (GRPO's
``step_time``) stays; ours goes beside it as ``mfu/step_time``. When training ends, ``summary``
holds the run's means, also on the callback the user built when the Trainer rebuilt it from a
checkpoint (``restore_callback_states_from_checkpoint=True``).

Evaluation and checkpoint saves are not training: their time leaves the step time and the input
wait. The Trainer runs them after ``on_step_end`` (log, then evaluate, then save), and a callback
gets no hook as they begin. So a second, small callback is put at the end of the Trainer's list: it
reads the decision of the Trainer's flow (``control.should_evaluate``/``should_save``, set by every
callback before it) and pauses the timer, after the row's log when the step logs (the read and the
reporters stay in the time base, as on any other step). ``on_save`` ends the pause, or
``on_evaluate`` when no save follows (both at the end of the list, after the other callbacks' own
work in those hooks); the next ``on_step_begin`` ends it in any case. The first
forward in eval mode between two steps pauses too (an evaluation the flow did not announce); it
misses the evaluation's set-up and first batch, the announced way misses nothing.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable
from typing import Any, Unpack, cast

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

from ._guard import entry_point
from ._options import FUNCTION_OPTIONS, MFUOptions, OptionKeywords
from ._session import MeterSession
from .precision import dtype_from_hf_args

logger = logging.getLogger("mfu_callbacks")
# Under the "transformers" logger: what Trainer users see, at the verbosity they set for the Trainer.
trainer_logger = transformers_logging.get_logger("transformers.mfu_callbacks")


class MFUCallback(TrainerCallback, ExportableState):
    """Logs ``mfu``, ``hfu``, ``tflops_per_gpu``, ``tokens_per_sec`` ... beside ``loss``.

    Options are those of [`mfu_callbacks.MFUOptions`][mfu_callbacks.MFUOptions]; ``prefix`` defaults to ""
    because the Trainer's reporting callbacks add ``train/`` themselves. When training ends,
    ``summary`` holds the run's means (after warm-up).
    """

    def __init__(self, **options: Unpack[OptionKeywords]) -> None:
        given: dict[str, Any] = dict(options)
        restored = given.pop(_RESTORED, None)  # rebuilt by the Trainer from a checkpoint's saved args
        if restored is not None:
            given = _restorable(given, restored)
        given.setdefault("prefix", "")
        self.options = MFUOptions(**given)
        self.session = MeterSession(
            self.options,
            "mfu_callbacks.transformers.MFUCallback",
            wandb_prefix="train/" + self.options.prefix,  # the Trainer's WandbCallback adds "train/"
            wandb_step_metric="train/global_step",
            warn=trainer_logger.warning,
        )
        self.summary: dict[str, float] = {}
        self.mfu_state: dict[str, Any] | None = None  # set by the Trainer when it restores callback states
        # A callback the Trainer rebuilt from a checkpoint hands its summary to the one the user built.
        self._rebuilt = restored is not None
        self._began = False
        self._replaces: Callable[[], MFUCallback | None] = lambda: None
        if not self._rebuilt:
            _BUILT_BY_USERS.add(self)
        self._after_the_flow = _AfterTheFlow(self)  # runs last: sees what the Trainer decided to do next
        self._pause_after_log = False  # an evaluation or a save follows this step's log
        self._read_ahead: dict[str, float] | None = None  # read at the step's end, for its log row

    @entry_point(default=lambda: {"args": {}, "attributes": {}})
    def state(self) -> dict[str, Any]:
        """What the Trainer saves in a checkpoint (``ExportableState``): the options that can be
        written as JSON, and the meter's run totals, so a resumed run's summary continues this one."""
        return {"args": _json_options(self.options), "attributes": {"mfu_state": self.session.state_dict()}}

    @entry_point()
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self.session.start_run()  # a second train(), or one after an interrupted run, starts clean
        self._read_ahead = None
        self._began = True
        if self._rebuilt:
            self._replaces = _replaced_by_rebuilt()
        if state.global_step > 0:  # resuming from a checkpoint
            self.session.continue_from_step(state.global_step)
            self.session.load_state_dict(self.mfu_state or _saved_state(state, type(self).__name__))
        self.mfu_state = None
        self.session.write_summary_to(args.output_dir)
        if self.session.guard.run(move_to_front_of_callback_lists, self, self._after_the_flow) is False:
            logger.warning(
                "mfu_callbacks: could not find the Trainer's callback list to run MFUCallback ahead of the "
                "reporting callbacks; MFU reaches only the callbacks after it (and state.log_history)"
            )
        if model is None:
            return
        self.session.attach(model, dtype=dtype_from_hf_args(bool(args.bf16), bool(args.fp16)))
        self.session.watch_forward(model)

    @entry_point()
    def on_step_begin(self, args, state, control, **kwargs):
        self._pause_after_log = False
        self.session.begin_step()  # ends any pause

    @entry_point()
    def on_step_end(self, args, state, control, **kwargs):
        self.session.end_step()

    @entry_point()
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.session.due(True):
            return
        metrics, self._read_ahead = self._read_ahead, None
        if metrics is None:
            metrics = self.session.read()
        if not metrics:
            return
        record = saved_log_record(state)
        metrics = self.session.beside({*logs, *(record or {})}, metrics)  # never replace the Trainer's keys
        logs.update(metrics)  # what the callbacks after this one (the reporters) log
        if record is not None:
            record.update(metrics)

    def _flow_decided(self, control: TrainerControl, *, step_ended: bool = False) -> None:
        """Every callback has seen the step (or epoch) end: read now if the Trainer logs this step, and
        pause if an evaluation or a save follows."""
        self._pause_after_log = False
        if step_ended and control.should_log and self.session.due(True):
            # Read while the GPU still runs the step: the Trainer waits for it before logging (the
            # loss's ``item()``), so the read's host time is hidden there, where at ``on_log`` it would
            # add to the step. The row gets what was read here.
            self._read_ahead = self.session.read()
        if control.should_evaluate or control.should_save:
            if control.should_log:
                self._pause_after_log = True  # after the row is logged (and read), as on any step
            else:
                self.session.pause()

    def _row_logged(self) -> None:
        if self._pause_after_log:
            self._pause_after_log = False
            self.session.pause()

    @entry_point()
    def on_train_end(self, args, state, control, **kwargs):
        self.summary = self.session.finish()
        replaced = self._replaces()
        if replaced is not None:
            replaced.summary = self.summary


# Callbacks users built (not rebuilt from a checkpoint), while they hold them.
_BUILT_BY_USERS: weakref.WeakSet[MFUCallback] = weakref.WeakSet()


def _replaced_by_rebuilt() -> Callable[[], MFUCallback | None]:
    """The callback a rebuilt one replaces, as a weak reference: with
    ``restore_callback_states_from_checkpoint=True`` the Trainer swaps the user's callback for one built
    from the checkpoint's saved options, before the run begins; that user's callback is the one built
    and not yet begun. None (with a warning) when there is not exactly one: its ``summary`` stays empty."""
    gc.collect()  # a callback and its helper hold each other: only a collection lets a dropped one go
    waiting = [callback for callback in _BUILT_BY_USERS if not callback._began]
    if len(waiting) != 1:
        trainer_logger.warning(
            "mfu_callbacks: the Trainer rebuilt MFUCallback from the checkpoint "
            "(restore_callback_states_from_checkpoint=True) and cannot tell which of "
            f"{len(waiting)} waiting callbacks it replaces: read summary from the rebuilt one, "
            "[c for c in trainer.callback_handler.callbacks if isinstance(c, MFUCallback)][0].summary"
        )
        return lambda: None
    (replaced,) = waiting
    replaced._began = True  # replaced for this run: not waiting any more
    return weakref.ref(replaced)


class _AfterTheFlow(TrainerCallback):
    """The end of the Trainer's callback list: by then the flow (``DefaultFlowCallback``, and any
    callback that changes ``control``) has decided whether this step is followed by an evaluation or a
    save, and the reporters have logged the row."""

    def __init__(self, owner: MFUCallback) -> None:
        self._owner = owner

    @property
    def session(self) -> MeterSession:
        """The owner's session: its guard guards these hooks too."""
        return self._owner.session

    @entry_point()
    def on_step_end(self, args, state, control, **kwargs):
        self._owner._flow_decided(control, step_ended=True)

    @entry_point()
    def on_epoch_end(self, args, state, control, **kwargs):
        self._owner._flow_decided(control)

    @entry_point()
    def on_log(self, args, state, control, logs=None, **kwargs):
        self._owner._row_logged()

    # Here, after every callback's own on_evaluate and on_save (work done there is not training either).
    @entry_point()
    def on_evaluate(self, args, state, control, **kwargs):
        # A save may follow: as the flow decided, or as "best" decides only after this hook.
        if not control.should_save and args.save_strategy != "best":
            self._owner.session.resume()

    @entry_point()
    def on_save(self, args, state, control, **kwargs):
        self._owner.session.resume()  # the last of the step's log, evaluation and save


def move_to_front_of_callback_lists(callback: TrainerCallback, last: TrainerCallback | None = None) -> bool:
    """Put ``callback`` first in the Trainer's callback list, so that its ``on_log`` runs before the
    reporting callbacks', and ``last`` (if given) at its end; False when no such list is found.

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
            if last is not None and not any(item is last for item in referrer):
                referrer.append(last)
            found = True
    return found


def saved_log_record(state: TrainerState) -> dict[str, Any] | None:
    """The record ``Trainer.log`` has just appended to ``state.log_history`` (None if there is none).

    ``Trainer.log`` appends a copy of ``logs`` (plus ``step``) before it calls ``on_log``, so what
    the reporters get and what ``trainer_state.json`` keeps (read by ``mfu-callbacks plot``) only
    agree if both are given the metrics.
    """
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        return state.log_history[-1]
    return None


# In the saved args: the options that could not be saved (functions), marking args a checkpoint wrote.
_RESTORED = "mfu_not_saved"


def _json_options(options: MFUOptions) -> dict[str, Any]:
    """The options a checkpoint can hold as JSON (``MFUOptions.to_json``): all but functions, which are
    named under ``mfu_not_saved`` so that a rebuilt callback can say they are gone."""
    return {
        **options.to_json(),
        _RESTORED: [name for name in FUNCTION_OPTIONS if getattr(options, name) is not None],
    }


def _restorable(saved: dict[str, Any], not_saved: Any) -> dict[str, Any]:
    """The saved options this version knows (unknown ones, from a newer version, are dropped with a
    warning), saying once which functions could not travel in the checkpoint."""
    unknown = MFUOptions.unknown(saved)
    if unknown:
        trainer_logger.warning(
            f"mfu_callbacks: ignored options saved in the checkpoint that this version does not know: {unknown}"
        )
    lost = [name for name in not_saved if name in FUNCTION_OPTIONS] if isinstance(not_saved, list) else []
    if lost:
        trainer_logger.warning(
            f"mfu_callbacks: the callback rebuilt from the checkpoint has no {' or '.join(lost)}: functions "
            "cannot be saved in a checkpoint; pass them again (restore_callback_states_from_checkpoint=False "
            "keeps the callback you built)"
        )
    return {key: value for key, value in saved.items() if key not in unknown}


def _saved_state(state: TrainerState, name: str) -> dict[str, Any]:
    """This callback's saved meter state in a resumed ``TrainerState`` (``stateful_callbacks``)."""
    # Annotated as the list of callbacks TrainerState is given; its __post_init__ turns that into a dict.
    callbacks = cast("dict[str, Any] | None", state.stateful_callbacks)
    saved = (callbacks or {}).get(name)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
    return attributes.get("mfu_state") or {}
