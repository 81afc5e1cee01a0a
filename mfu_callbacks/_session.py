"""What every integration does, in framework-neutral terms: see micro-batches, bracket steps, read metrics.

The integrations only translate their framework's events into these calls and hand the metrics to
the framework's logger.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

from torch import nn

from . import distributed
from ._forward_watch import ForwardWatch
from ._guard import Guard
from ._meter_state import SAVED_OPTIONS, SAVED_STEP, load_or_discard, saved_step
from ._options import MFUOptions
from ._run_outputs import RunOutputs
from ._status import MFUStatus, RunStatus, Status
from .meter import MFUMeter, device_of, join_reduction_as_failed
from .metrics import MFU_STATUS, placed_beside


class MeterSession:
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

    # -- what is not training: evaluation runs and checkpoint saves -------------------------------------
    def pause(self) -> None:
        """Work that is not training begins (evaluation, a checkpoint save): until ``resume()`` or the
        next step begins, its time is neither step time nor input wait (``StepTimer.paused``), so it
        never lowers MFU nor reads as waiting for input. Pausing again while paused changes nothing."""
        meter = self.meter
        if self._pause is not None or meter is None:
            return

        def enter() -> AbstractContextManager[None]:
            pause = meter.not_training()
            pause.__enter__()
            return pause

        self._pause = self.guard.run(enter)

    def resume(self) -> None:
        """Training goes on: the time after this counts again (nothing happens when not paused)."""
        pause, self._pause = self._pause, None
        if pause is not None:
            self.guard.run(pause.__exit__, None, None, None)

    @property
    def paused(self) -> bool:
        return self._pause is not None

    @contextmanager
    def not_training(self) -> Iterator[None]:
        """``pause()`` around a block (ends the pause only if it opened it)."""
        opened = self._pause is None
        self.pause()
        try:
            yield
        finally:
            if opened:
                self.resume()

    def due(self, framework_logs_now: bool) -> bool:
        """Whether to read metrics now: at the framework's cadence, or every ``log_interval`` steps."""
        if self.options.log_interval is None:
            return framework_logs_now
        return self.optimizer_steps > 0 and self.optimizer_steps % self.options.log_interval == 0

    def read(self) -> dict[str, float]:
        """Metrics of the window since the last read, prefixed; {} when there is nothing to say.

        When distributed this is a collective, and a rank whose measurement failed still takes part
        (as "failed"), so no rank ever waits for another. The invariant, enforced here and in the
        meter's read: **every rank enters exactly one reduction per read**. The meter's read enters it
        whatever fails inside; a failure before it (or a failed meter) joins it as "failed" in the
        ``finally`` below; a failure after it only stops this rank's measuring.
        """
        entered = distributed.reductions_entered()
        try:
            return self._read()
        except Exception as error:  # noqa: BLE001 - training goes on; the guard says it once
            self.guard.fail(error)
            return self._prefixed({MFU_STATUS: float(MFUStatus.OFF)})
        finally:
            if distributed.reductions_entered() == entered:
                self._join_as_failed()

    def _read(self) -> dict[str, float]:
        meter = self.meter
        if meter is None or self.guard.failed:
            return self._prefixed(self._with_status({}))
        own_work = self.guard.run(meter.own_work)  # the whole read is counted as the meter's time
        with own_work if own_work is not None else nullcontext():
            metrics: dict[str, float] = (
                self.guard.run(meter.metrics, read_at=self._steps_this_run, default={}) or {}
            )
            if metrics:
                # Reporting extras have a guard of their own: a failure there never stops the measurement.
                if not self._wandb_described:
                    self._extras_guard.run(self._describe_wandb_run)
                self._extras_guard.run(self._add_to_run_summary, metrics)
            return self._prefixed(self._with_status(metrics))

    def _prefixed(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {self.options.prefix + key: value for key, value in metrics.items()}

    def beside(self, row: Collection[str], metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` (from ``read()``) as they go into a logged row that already holds the keys ``row``.

        Never overwrite: where the trainer or the user logged one of our keys (GRPO's own ``step_time``),
        ours goes beside it as ``mfu/<key>`` after the prefix (``mfu/step_time``, ``train/mfu/step_time``),
        under that name for the rest of the run, so a curve never changes meaning. Where that name is
        taken too, ours is left out.
        """
        return placed_beside(row, metrics, self.options.prefix, self._renamed)

    # -- the status: whether MFU is measured, said where users look (``_status.RunStatus``) ------------
    @property
    def status(self) -> Status:
        """What the last read (or the end of the run) found."""
        return self._status.current

    def _with_status(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` with ``mfu_status``; a status without MFU is warned about once per run."""
        self._status.set(self._judge(metrics))
        return {**metrics, MFU_STATUS: float(self.status.code)}

    def _judge(self, values: Mapping[str, float]) -> Status:
        past_warmup = self._steps_this_run > self.options.warmup_steps
        return self._status.judge(values, self.guard, self.meter, past_warmup=past_warmup)

    def _join_as_failed(self, *, final: bool = False) -> None:
        """Enter the read's reduction as a rank with nothing to say (none after a reduction failed)."""
        if self._attached and distributed.is_distributed() and distributed.reductions_broken() is None:
            with suppress(Exception):  # the collective itself failed: nothing more to do here
                join_reduction_as_failed(read_at=self._steps_this_run, final=final)

    def write_summary_to(self, framework_folder: str | os.PathLike[str] | None) -> None:
        """Write the run summary into the ``summary_dir`` option, else the framework's output folder."""
        self._outputs.write_summary_to(framework_folder)

    @property
    def summary_dir(self) -> str | None:
        """Where the run summary (``mfu_summary.json``) is written; None: nowhere."""
        return self._outputs.summary_dir

    def _add_to_run_summary(self, metrics: Mapping[str, float]) -> None:
        if self.meter is not None:
            self._outputs.add_window(
                self.meter,
                self._model,
                self.status,
                self.optimizer_steps,
                metrics,
                resumed_at=self._resumed_at,
            )

    @property
    def _wandb_described(self) -> bool:
        return self._outputs.wandb_described

    def _describe_wandb_run(self) -> None:
        if self.meter is not None:
            self._outputs.describe_wandb_run(self.meter, self._model)

    def _sync_summary(self, *, close: bool = False) -> None:
        self._outputs.sync(self.meter, self._model, self.status, resumed_at=self._resumed_at, close=close)

    def summary(self) -> dict[str, float]:
        """The run's means (a collective when distributed, joined as "failed" after a failure; exactly
        one reduction whatever fails, as in ``read``)."""
        entered = distributed.reductions_entered()
        try:
            if self.meter is None or self.guard.failed:
                return {}
            return self.guard.run(self.meter.summary, read_at=self._steps_this_run, default={}) or {}
        finally:
            if distributed.reductions_entered() == entered:
                self._join_as_failed(final=True)

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
