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

A forward pre-hook on the model sees each training micro-batch; the step ends when the wrapped
optimizer really steps (only on ``sync_gradients`` under ``accelerator.accumulate``). Every
``log_interval`` optimizer steps (on all ranks at once, so the one all-reduce is safe) the metrics
are read; the next ``accelerator.log`` call carries them beside the loss, to every tracker the
accelerator has (W&B included). ``accelerator.end_training()`` (or ``tracker.finish()``) prints the
end-of-run report and writes the run's means to the W&B summary.
"""

from __future__ import annotations

import functools
from typing import Any

from accelerate import Accelerator
from torch import nn

from ._options import MFUOptions
from ._session import MeterSession

_DEFAULT_LOG_INTERVAL = 10
_PRECISION_TO_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}


class MFUTracker:
    """Adds ``train/mfu``, ``train/hfu``, ``train/tflops_per_gpu`` ... to the accelerator's logs.

    Create it after ``accelerator.prepare``. Options are those of
    :class:`~mfu_callbacks._options.MFUOptions`; ``log_interval`` defaults to 10 optimizer steps.
    ``latest`` holds the last metrics read, for loops that log elsewhere.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, **options: Any) -> None:
        if options.get("log_interval") is None:  # Accelerate has no logging cadence of its own to follow
            options["log_interval"] = _DEFAULT_LOG_INTERVAL
        self.options = MFUOptions(**options)
        self.accelerator = accelerator
        self.latest: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self.session = MeterSession(self.options, "mfu_callbacks.accelerate.MFUTracker")
        self.session.attach(model, dtype=_PRECISION_TO_DTYPE.get(str(accelerator.mixed_precision)))
        self.session.watch_forward(model)
        self._hooks = [self._watch_optimizer(optimizer) for optimizer in accelerator._optimizers]
        self._wrap_log()
        self._wrap_end_training()
        self.final_summary: dict[str, float] | None = None

    def _watch_optimizer(self, optimizer: Any):
        inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer steps the inner one only on sync
        return inner.register_step_post_hook(lambda *_: self._optimizer_stepped())

    def _optimizer_stepped(self) -> None:
        self.session.end_step()
        if self.session.due(False):
            metrics = self.session.read()
            if metrics:
                self.latest = metrics
                self._pending = metrics

    def _wrap_log(self) -> None:
        original = self.accelerator.log

        @functools.wraps(original)
        def log(values: dict, step: int | None = None, log_kwargs: dict | None = None):
            if self._pending:
                values = {**values, **self._pending}
                self._pending = {}
            return original(values, step=step, log_kwargs=log_kwargs or {})

        self.accelerator.log = log

    def _wrap_end_training(self) -> None:
        original = self.accelerator.end_training

        @functools.wraps(original)
        def end_training(*args: Any, **kwargs: Any):
            self.finish()  # before the trackers close and the process group goes away
            return original(*args, **kwargs)

        self.accelerator.end_training = end_training

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
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
