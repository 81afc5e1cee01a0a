"""MFU for a hand-written Hugging Face Accelerate loop, with one added line.

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = MFUTracker(accelerator, model)          # the added line
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        accelerator.log({"train/loss": loss.item()}, step=step)   # now carries train/mfu too

A forward pre-hook on the model sees each training micro-batch; the step ends when an optimizer
that holds the model's parameters really steps (torch's global optimizer step hook sees it; under
``accelerator.accumulate`` the prepared optimizer steps its inner one only on ``sync_gradients``). Every
``log_interval`` optimizer steps (on all ranks at once, so the one all-reduce is safe) the metrics
are read; the next ``accelerator.log`` call carries them beside the loss, to every tracker the
accelerator has (W&B included); a key the loop logs itself (``train/step_time``) stays, and ours goes
beside it as ``train/mfu/step_time``. ``accelerator.end_training()`` (or ``tracker.finish()``) prints the
end-of-run report and writes the run's means to the W&B summary. ``accelerator.save_state`` writes the
meter's run totals to ``mfu_state.json`` in the checkpoint's folder (JSON, on the main process) and
``accelerator.load_state`` continues them.

Evaluation and ``accelerator.save_state`` are not training: their time leaves the step time and the
input wait. A save is paused from its start to its end; an evaluation from the model's first forward
in eval mode between two steps to the next training forward (so the loading of the next training
batch, after the evaluation, is left out too).
"""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path
from typing import Any, Unpack

from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from ._extras import missing_extra

try:
    from accelerate import Accelerator
    from accelerate.logging import get_logger
except ImportError as error:
    raise missing_extra(error, "mfu_callbacks.accelerate", "accelerate") from error

from ._atomic import write_json
from ._guard import entry_point
from ._options import MFUOptions, OptionKeywords
from ._session import MeterSession

_DEFAULT_LOG_INTERVAL = 10
# The run's dtype: that of the matmuls not in fp8. Accelerate's "fp8" runs them under bf16 autocast
# (``get_mixed_precision_context_manager``); its fp8 matmuls are seen as such, or declared.
_PRECISION_TO_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}
STATE_FILE = "mfu_state.json"  # the meter's run totals, beside the files of ``accelerator.save_state``


class MFUTracker:
    """Adds ``train/mfu``, ``train/hfu``, ``train/tflops_per_gpu`` ... to the accelerator's logs.

    Create it after ``accelerator.prepare``. Options are those of
    [`mfu_callbacks.MFUOptions`][mfu_callbacks.MFUOptions]; ``log_interval`` defaults to 10 optimizer steps.
    ``latest`` holds the last metrics read, for loops that log elsewhere.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, **options: Unpack[OptionKeywords]) -> None:
        given: dict[str, Any] = dict(options)
        if given.get("log_interval") is None:  # Accelerate has no logging cadence of its own to follow
            given["log_interval"] = _DEFAULT_LOG_INTERVAL
        self.options = MFUOptions(**given)
        self.accelerator = accelerator
        self.latest: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self._warn = get_logger("mfu_callbacks.accelerate").warning
        self._checkpoint_hooks: list[RemovableHandle] = []
        self.session = MeterSession(self.options, "mfu_callbacks.accelerate.MFUTracker", warn=self._warn)
        self.session.attach(model, dtype=_PRECISION_TO_DTYPE.get(str(accelerator.mixed_precision)))
        self.session.watch_forward(model)
        self._parameter_ids = {id(parameter) for parameter in model.parameters()}
        self._trains_model: weakref.WeakKeyDictionary[Optimizer, bool] = weakref.WeakKeyDictionary()
        self._hooks = [register_optimizer_step_post_hook(self._after_optimizer_step)]
        self._wrap_log()
        self._wrap_save_state()
        self._wrap_end_training()
        self.final_summary: dict[str, float] | None = None
        self.session.write_summary_to(accelerator.project_dir)
        self._keep_state_in_checkpoints()

    # -- checkpoints: the meter's run totals as JSON beside Accelerate's files --------------------
    def _keep_state_in_checkpoints(self) -> None:
        """``accelerator.save_state`` writes the run totals to ``mfu_state.json`` in its folder and
        ``load_state`` continues them. JSON, never pickle (``register_for_checkpointing`` would write a
        pickle that ``load_state`` unpickles, and tie the checkpoint to the tracker): a checkpoint saved
        with the tracker loads without it, and one saved without it loads with it (MFU starts afresh)."""
        save_hook = getattr(self.accelerator, "register_save_state_pre_hook", None)
        load_hook = getattr(self.accelerator, "register_load_state_pre_hook", None)
        if save_hook is None or load_hook is None:
            self._warn(
                "mfu_callbacks: this accelerate has no save/load state hooks; checkpoints do not keep "
                "the MFU run totals and a resumed run starts them afresh"
            )
            return
        self._checkpoint_hooks = [save_hook(self._save_state), load_hook(self._load_state)]

    @entry_point()
    def _save_state(self, models: Any, weights: Any, output_dir: str) -> None:
        """Write the run totals beside the checkpoint (main process; a failure costs only the file)."""
        if not self.accelerator.is_main_process:
            return
        try:
            write_json(Path(output_dir) / STATE_FILE, self.session.state_dict())
        except Exception as error:  # noqa: BLE001 - saving the checkpoint goes on without our file
            self._warn(f"mfu_callbacks: could not write {STATE_FILE} ({type(error).__name__}: {error})")

    @entry_point()
    def _load_state(self, models: Any, input_dir: str) -> None:
        """Continue the run totals saved beside the checkpoint; a missing file is a checkpoint saved
        without the tracker (MFU starts afresh), an unreadable one is ignored with a warning."""
        path = Path(input_dir) / STATE_FILE
        if not path.is_file():
            return
        meter = self.session.meter
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
            if meter is None or self.session.guard.failed:
                self.session.load_state_dict(state)
                return
            before = meter.state_dict()
            try:
                meter.load_state_dict(state)
            except BaseException:
                meter.load_state_dict(before)
                raise
        except Exception as error:  # noqa: BLE001 - loading the checkpoint goes on; MFU starts afresh
            self._warn(
                f"mfu_callbacks: ignored {path} ({type(error).__name__}: {error}); "
                "the MFU run totals start afresh"
            )

    def state_dict(self) -> dict[str, Any]:
        """The meter's run totals (what ``accelerator.save_state`` writes to ``mfu_state.json``)."""
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the run totals of an earlier run (``accelerator.load_state`` does it from ``mfu_state.json``)."""
        self.session.load_state_dict(state_dict)

    @entry_point()
    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Called after every optimizer step in the process; acts on those of this model's optimizer.

        Runs after a failure on this rank too (an entry point only catches): the read must still
        happen here, at the same step as on the other ranks (the session then joins it as "failed").
        """
        trains_model = self._trains_model.get(optimizer)
        if trains_model is None:
            try:
                trains_model = self._holds_model_parameters(optimizer)
            except Exception:  # noqa: BLE001 - an optimizer we cannot read is not ours
                trains_model = False
            self._trains_model[optimizer] = trains_model
        if not trains_model:
            return
        self.session.end_step()
        if self.session.due(False):
            metrics = self.session.read()
            if metrics:
                self.latest = metrics
                self._pending = metrics

    def _holds_model_parameters(self, optimizer: Optimizer) -> bool:
        if isinstance(getattr(optimizer, "optimizer", None), Optimizer):
            return False  # a wrapper (AcceleratedOptimizer): its inner optimizer's steps are the real ones
        return any(id(p) in self._parameter_ids for group in optimizer.param_groups for p in group["params"])

    def _wrap_log(self) -> None:
        """``accelerator.log(values, ...)`` gets the pending metrics merged into ``values``; every
        other argument goes through as given."""
        original = self.accelerator.log

        @functools.wraps(original)
        def log(*args: Any, **kwargs: Any):
            merged = self._with_pending(args, kwargs)  # behind the guard; the user's call is not
            if merged is not None:
                args, kwargs = merged
            return original(*args, **kwargs)

        self.accelerator.log = log

    @entry_point()
    def _with_pending(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """``accelerator.log``'s arguments with the pending metrics added beside its values, never over one
        of the loop's keys (None: as given)."""
        if not self._pending:
            return None
        if args:
            args = (self._beside(args[0]), *args[1:])
        elif "values" in kwargs:
            kwargs = {**kwargs, "values": self._beside(kwargs["values"])}
        self._pending = {}
        return args, kwargs

    def _beside(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with the pending metrics added beside them (never over one of the loop's keys)."""
        return {**values, **self.session.beside(values, self._pending)}

    def _wrap_save_state(self) -> None:
        """``accelerator.save_state`` is paused as a whole: saving is not training."""
        original = self.accelerator.save_state

        @functools.wraps(original)
        def save_state(*args: Any, **kwargs: Any):
            with self.session.not_training():
                return original(*args, **kwargs)

        self.accelerator.save_state = save_state

    def _wrap_end_training(self) -> None:
        original = self.accelerator.end_training

        @functools.wraps(original)
        def end_training(*args: Any, **kwargs: Any):
            self.finish()  # before the trackers close and the process group goes away
            return original(*args, **kwargs)

        self.accelerator.end_training = end_training

    @entry_point(default=dict)
    def finish(self) -> dict[str, float]:
        """Training ended: the run's means, the end-of-run report (rank 0) and the W&B summary, once.

        Called by ``accelerator.end_training()``; call it yourself (on every rank) if the loop never does.
        """
        if self.final_summary is None:
            self.final_summary = self.session.finish()
            self.close()
        return self.final_summary

    def metrics(self) -> dict[str, float]:
        """The metrics of the steps since the last read, now (call on every rank when distributed)."""
        metrics = self.session.read()
        if metrics:
            self.latest = metrics
        return metrics

    def summary(self) -> dict[str, float]:
        """Run means after warm-up."""
        return self.session.summary()

    def close(self) -> None:
        """Remove the hooks (the accelerator's ``log`` stays wrapped, passing values through)."""
        self.session.unwatch()
        for hook in [*self._hooks, *self._checkpoint_hooks]:
            hook.remove()
        self._hooks, self._checkpoint_hooks = [], []
