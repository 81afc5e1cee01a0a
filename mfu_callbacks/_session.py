"""What every integration does, in framework-neutral terms: see micro-batches, bracket steps, read metrics.

The integrations only translate their framework's events into these calls and hand the metrics to
the framework's logger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _wandb, distributed
from ._guard import Guard
from ._options import MFUOptions
from .meter import MFUMeter
from .report import format_report


class MeterSession:
    """One training run's meter, built lazily, with every call guarded."""

    def __init__(self, options: MFUOptions, owner: str, *, wandb_prefix: str | None = None,
                 wandb_step_metric: str | None = None) -> None:
        """``wandb_prefix``: how the metric names appear in W&B (the framework may add its own prefix);
        ``wandb_step_metric``: the framework's global-step key in W&B, the axis MFU is plotted against.
        """
        self.options = options
        self._wandb_prefix = options.prefix if wandb_prefix is None else wandb_prefix
        self._wandb_step_metric = wandb_step_metric
        self._wandb_described = False
        self.guard = Guard(owner)
        self.meter: MFUMeter | None = None
        self.optimizer_steps = 0
        self._step_open = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, model: nn.Module, *, dtype: str | None = None, engine_model: nn.Module | None = None) -> None:
        """Create the meter for ``model`` (``engine_model`` is what the FLOP engine introspects, default ``model``)."""

        def create() -> None:
            self.meter = MFUMeter(
                engine_model if engine_model is not None else model,
                peak_tflops=self.options.peak_tflops,
                dtype=self.options.dtype or dtype,
                warmup_steps=self.options.warmup_steps,
                forward=self.options.forward,
                token_counter=self.options.token_counter,
                device=_device_of(model),
                silence_diagnostics=self.options.silence_diagnostics,
            )

        self.guard.run(create)

    # -- micro-batches seen by a forward pre-hook (when the framework hands callbacks no batch) --
    def watch_forward(self, model: nn.Module, on_first_batch: Callable[[], None] | None = None) -> None:
        """Count each training forward of ``model`` as a micro-batch of the open step."""

        @torch.compiler.disable
        def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return  # evaluation and generation are not training steps
            batch = kwargs if kwargs else (args[0] if len(args) == 1 else args)
            if not self._step_open:
                self.begin_step()
            self.add_batch(batch)

        self._hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)

    def unwatch(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- step events ------------------------------------------------------------------------------
    def begin_step(self, batch: Any = None) -> None:
        if self.meter is not None and not self._step_open:
            self._step_open = True
            self.guard.run(self.meter.start_step, batch)

    def add_batch(self, batch: Any) -> None:
        if self.meter is not None and self._step_open:
            self.guard.run(self.meter.add_batch, batch)

    def end_step(self) -> None:
        if self.meter is not None and self._step_open:
            self._step_open = False
            self.optimizer_steps += 1
            self.guard.run(self.meter.end_step)

    def due(self, framework_logs_now: bool) -> bool:
        """Whether to read metrics now: at the framework's cadence, or every ``log_interval`` steps."""
        if self.options.log_interval is None:
            return framework_logs_now
        return self.optimizer_steps > 0 and self.optimizer_steps % self.options.log_interval == 0

    def read(self) -> dict[str, float]:
        """Metrics of the window since the last read, prefixed; {} when there is nothing to say."""
        if self.meter is None:
            return {}
        metrics = self.guard.run(self.meter.metrics, default={}) or {}
        if metrics and not self._wandb_described:
            self.guard.run(self._describe_wandb_run)
        return {self.options.prefix + key: value for key, value in metrics.items()}

    def _describe_wandb_run(self) -> None:
        run = _wandb.active_run()
        if run is None or self.meter is None:
            return
        self._wandb_described = True
        engine = self.meter.engine
        config = _wandb.run_config(
            self.meter.peak, engine.flops_per_token if engine is not None else None, self.meter.run_flops()
        )
        _wandb.describe_run(run, config, self._wandb_prefix, self._wandb_step_metric)

    def summary(self) -> dict[str, float]:
        if self.meter is None:
            return {}
        return self.guard.run(self.meter.summary, default={}) or {}

    def finish(self) -> dict[str, float]:
        """Training ended: the run's summary (a collective when distributed: every rank calls this),
        printed as the end-of-run report on rank 0 and written to the W&B run summary."""
        summary = self.summary()
        if self.meter is None or not summary:
            return summary

        def report() -> None:
            meter = self.meter
            diagnoses = meter.diagnostics()
            if distributed.rank() != 0:
                return
            if self.options.report:
                print(format_report(summary, meter.run_flops(), meter.peak, diagnoses), flush=True)
            run = _wandb.active_run()
            if run is not None:
                _wandb.summarize_run(run, summary, diagnoses)

        self.guard.run(report)
        return summary


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
