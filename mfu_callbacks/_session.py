"""What every integration does, in framework-neutral terms: see micro-batches, bracket steps, read metrics.

The integrations only translate their framework's events into these calls and hand the metrics to
the framework's logger.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, suppress
from typing import Any

from torch import nn

from . import distributed
from ._forward_watch import ForwardWatch
from ._guard import Guard
from ._meter_state import SAVED_OPTIONS, SAVED_STEP, load_or_discard, saved_step
from ._options import MFUOptions
from ._run_outputs import RunOutputs
from ._session_pause import PauseHooks
from ._session_read import ReadHooks
from ._status import RunStatus
from .meter import MFUMeter, device_of


class MeterSession(PauseHooks, ReadHooks):
    """One training run's meter, built lazily, with every call guarded."""

    def __init__(
        self,
        options: MFUOptions,
        owner: str,
        *,
        wandb_prefix: str | None = None,
        wandb_step_metric: str | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """``wandb_prefix``: how the metric names appear in W&B (the framework may add its own prefix);
        ``wandb_step_metric``: the framework's global-step key in W&B, the axis MFU is plotted against;
        ``warn``: says that MFU is not measured where the framework's users look (default: a warning).
        """
        self.options = options
        self._owner = owner
        self._outputs = RunOutputs(options, wandb_prefix=wandb_prefix, wandb_step_metric=wandb_step_metric)
        self._warn = warn or _warn
        self._watch: ForwardWatch | None = None
        self._resume_state: Mapping[str, Any] | None = None
        self.start_run()

    def start_run(self) -> None:
        """A run starts: whatever an earlier run left (finished, failed or interrupted) is cleared."""
        self.unwatch()
        self._outputs.start_run()
        self.guard = Guard(self._owner)
        self._extras_guard = Guard(self._owner, stops="writing the run summary and the W&B run description")
        self.meter: MFUMeter | None = None
        self.optimizer_steps = 0  # the framework's global step: continued on resume
        self._steps_this_run = 0  # warm-up starts again in a resumed process
        self._resumed_at: int | None = None  # the global step a resumed run continues from
        self._step_open = False
        self._pause: AbstractContextManager[None] | None = None  # open while evaluating or saving
        self._renamed: set[str] = set()  # our keys the trainer or the user logs too: logged as mfu/<key>
        self._attached = False
        self._model: nn.Module | None = None
        self._status = RunStatus(self._warn)

    def attach(self, model: nn.Module, *, dtype: str | None = None) -> None:
        """Create the meter for ``model`` (continuing a resumed run's totals, if any were loaded)."""

        def create() -> None:
            self.meter = MFUMeter(model, options=self.options, run_dtype=dtype, device=device_of(model))
            if self._resume_state is not None:
                step = saved_step(self._resume_state)
                if self._resumed_at is None and step is not None:
                    self.continue_from_step(step)
                load_or_discard(self.meter, self._resume_state, self._warn)
                self._resume_state = None

        self._attached = True
        self._model = model
        self.guard.run(distributed.prepare_reductions)  # collective: attach runs on every rank
        self.guard.run(create)

    # -- resuming -----------------------------------------------------------------------------------
    def continue_from_step(self, global_step: int) -> None:
        """A resumed run goes on from the framework's ``global_step``: windows are numbered from there,
        and the run summary keeps the windows written up to it."""
        self.optimizer_steps = self._resumed_at = int(global_step)

    def state_dict(self) -> dict[str, Any]:
        """The meter's state for the framework's checkpoint (plain values; {} before a meter exists).

        Called when the framework saves a checkpoint: the run summary is made durable then too. The
        options the run was measured with go with it (``MFUOptions.to_json``), so the checkpoint alone
        says how to measure the resumed run alike (``MFUOptions.from_json``).
        """
        self._extras_guard.run(self._sync_summary)
        if self.meter is not None and not self.guard.failed:
            state: dict[str, Any] = self.guard.run(self.meter.state_dict) or {}
            if not state:
                return {}
            return {**state, SAVED_STEP: self.optimizer_steps, SAVED_OPTIONS: self.options.to_json()}
        return dict(self._resume_state or {})

    def load_state_dict(self, state: Mapping[str, Any], *, when_attached: bool = False) -> None:
        """Continue a checkpointed run: applied to the meter now if it exists, else when it is built
        (always then with ``when_attached``: the framework restores before the run starts)."""
        if not state:
            return
        if not isinstance(state, Mapping):
            self._warn(
                f"mfu_callbacks: ignored a saved MFU state that is a {type(state).__name__}; run totals start afresh"
            )
            return
        if self.meter is not None and not when_attached:
            load_or_discard(self.meter, state, self._warn)
        else:
            self._resume_state = dict(state)

    # -- micro-batches seen by a forward pre-hook (when the framework hands callbacks no batch) --
    def watch_forward(self, model: nn.Module) -> None:
        """Count each training forward of ``model`` as a micro-batch of the open step (``ForwardWatch``)."""
        self.unwatch()  # a run that ended by an exception may have left its hook
        self._watch = ForwardWatch(self, model)

    def unwatch(self) -> None:
        """Remove the forward hook, and leave a real step being observed (however the run ended)."""
        watch, self._watch = getattr(self, "_watch", None), None
        if watch is not None:
            watch.remove()
        meter = getattr(self, "meter", None)
        if meter is not None:
            with suppress(Exception):  # the run is over: nothing more to measure
                meter.stop_observing()

    # -- step events ------------------------------------------------------------------------------
    @property
    def step_open(self) -> bool:
        return self._step_open

    # Steps are followed even without a working meter: the read cadence (``due``) must stay the same
    # on every rank, since each read is a collective.
    def begin_step(self, batch: Any = None) -> None:
        self.resume()  # whatever paused the time between the steps, training goes on now
        if self._step_open:
            return
        self._step_open = True
        if self.meter is not None:
            self.guard.run(self.meter.start_step, batch)
            if self._watch is not None:
                self.guard.run(self._watch.watch_other_models)

    def add_batch(self, batch: Any) -> None:
        if self.meter is not None and self._step_open:
            self.guard.run(self.meter.add_batch, batch)

    def end_step(self) -> None:
        if not self._step_open:
            return
        self._step_open = False
        if self._watch is not None:
            self._watch.stop_watching_other_models()
        self.optimizer_steps += 1
        self._steps_this_run += 1
        if self.meter is not None:
            self.guard.run(self.meter.end_step)

    def write_summary_to(self, framework_folder: str | os.PathLike[str] | None) -> None:
        """Write the run summary into the ``summary_dir`` option, else the framework's output folder."""
        self._outputs.write_summary_to(framework_folder)

    @property
    def summary_dir(self) -> str | None:
        """Where the run summary (``mfu_summary.json``) is written; None: nowhere."""
        return self._outputs.summary_dir

    def _sync_summary(self, *, close: bool = False) -> None:
        self._outputs.sync(self.meter, self._model, self.status, resumed_at=self._resumed_at, close=close)

    def finish(self) -> dict[str, float]:
        """Training ended: the run's summary (a collective when distributed: every rank calls this),
        printed as the end-of-run report on rank 0 and written to the W&B run summary."""
        self.resume()
        self.unwatch()
        summary = self.summary()
        with suppress(Exception):  # every rank has left the last reduction: nothing of ours outlives the run
            distributed.release_reductions()
        self._status.finish(self._judge(summary))
        self._extras_guard.run(self._sync_summary, close=True)  # the setup as the run ended
        meter = self.meter
        if meter is None or not summary:
            self._extras_guard.run(self._outputs.report_not_measured, meter, self.status)
            return summary
        self.guard.run(self._outputs.report, meter, summary, self.status)
        return summary


def _warn(message: str) -> None:
    """The default way to say that MFU is not measured: a Python warning, shown by default."""
    warnings.warn(message, UserWarning, stacklevel=2)
