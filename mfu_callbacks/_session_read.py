"""``MeterSession``'s reads: when to read (the cadence), the read and the run's summary as collectives
(exactly one reduction per read on every rank, whatever fails), the metrics' names in the logged row,
and the status said with them. A part of the session's interface on its own (a mixin, as Lightning's
``LightningModule`` is made of ``ModelHooks``, ``DataHooks`` and ``CheckpointHooks``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import nullcontext, suppress

from torch import nn

from . import distributed
from ._guard import Guard
from ._options import MFUOptions
from ._run_outputs import RunOutputs
from ._status import MFUStatus, RunStatus, Status
from .meter import MFUMeter, join_reduction_as_failed
from .metrics import MFU_STATUS, placed_beside


class ReadHooks:
    """The read methods of ``MeterSession``, over the parts the session holds."""

    options: MFUOptions
    meter: MFUMeter | None
    guard: Guard
    optimizer_steps: int
    _extras_guard: Guard
    _outputs: RunOutputs
    _status: RunStatus
    _model: nn.Module | None
    _renamed: set[str]
    _attached: bool
    _steps_this_run: int
    _resumed_at: int | None

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
