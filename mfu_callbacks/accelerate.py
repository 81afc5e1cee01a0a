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
accelerator has (W&B included). ``accelerator.end_training()`` (or ``tracker.finish()``) prints the
end-of-run report and writes the run's means to the W&B summary.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

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
        self.session = MeterSession(
            self.options,
            "mfu_callbacks.accelerate.MFUTracker",
            warn=get_logger("mfu_callbacks.accelerate").warning,
        )
        self.session.attach(model, dtype=_PRECISION_TO_DTYPE.get(str(accelerator.mixed_precision)))
        self.session.watch_forward(model)
        self._parameter_ids = {id(parameter) for parameter in model.parameters()}
        self._trains_model: weakref.WeakKeyDictionary[Optimizer, bool] = weakref.WeakKeyDictionary()
        self._hooks = [register_optimizer_step_post_hook(self._after_optimizer_step)]
        self._wrap_log()
        self._wrap_end_training()
        self.final_summary: dict[str, float] | None = None
        self.session.write_summary_to(accelerator.project_dir)
        # accelerator.save_state / load_state keep the meter's run totals, so a resumed loop continues them.
        accelerator.register_for_checkpointing(self)

    def state_dict(self) -> dict[str, Any]:
        """The meter's run totals, for ``accelerator.save_state``."""
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the run totals saved by ``accelerator.save_state`` (via ``accelerator.load_state``)."""
        self.session.load_state_dict(state_dict)

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Called after every optimizer step in the process; acts on those of this model's optimizer.

        Not behind the session's guard: after a failure on this rank the read must still happen here,
        at the same step as on the other ranks (the session then joins it as "failed").
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
            if self._pending:
                if args:
                    args = ({**args[0], **self._pending}, *args[1:])
                elif "values" in kwargs:
                    kwargs["values"] = {**kwargs["values"], **self._pending}
                self._pending = {}
            return original(*args, **kwargs)

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
