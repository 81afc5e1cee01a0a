"""MFU for PyTorch Lightning.

    trainer = L.Trainer(callbacks=[MFUCallback()])

or, with LightningCLI, one line in the config's ``trainer.callbacks`` (see ``configs/``). The
callback brackets each optimizer step (``accumulate_grad_batches`` micro-batches) with the meter
and logs through ``LightningModule.log`` when Lightning writes its logs, so every logger (W&B,
TensorBoard, CSV) gets ``train/mfu`` at the same global step as the loss. FLOPs are those of
``training_step`` itself, traced on a meta-device replica of the module. A name the module (or
another callback) logs itself, such as ``train/step_time``, stays its own: ours is logged as
``train/mfu/step_time``.

Validation (``on_validation_start`` to ``on_validation_end``) and checkpoint saves (from the
callbacks' ``state_dict`` to the next training batch: Lightning has no hook after the file is written)
are not training: their time leaves the step time and the input wait.
"""

from __future__ import annotations

import warnings
from typing import Any, Unpack

from ._extras import missing_extra

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError as error:
    raise missing_extra(error, "mfu_callbacks.lightning", "lightning") from error

from ._guard import Guard, entry_point
from ._options import MFUOptions, OptionKeywords
from ._session import MeterSession
from .precision import dtype_from_lightning_precision


def _training_step(module: LightningModule, batch: Any) -> Any:
    """The default way a batch reaches a LightningModule: its own training_step (logging muted on the replica)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.training_step(batch, 0)


class MFUCallback(Callback):
    """Logs ``train/mfu``, ``train/hfu``, ``train/tflops_per_gpu``, ``train/tokens_per_sec`` ... beside the loss.

    Options are the fields of [`mfu_callbacks.MFUOptions`][mfu_callbacks.MFUOptions], where each is
    described; ``forward`` defaults to the module's own ``training_step``. When training ends, ``summary`` holds the run's means and the
    end-of-run report is printed on rank 0.

    Example::

        trainer = L.Trainer(max_steps=100, callbacks=[MFUCallback(warmup_steps=5)])
    """

    def __init__(self, **options: Unpack[OptionKeywords]) -> None:
        super().__init__()
        given: dict[str, Any] = dict(options)
        if given.get("forward") is None:  # LightningCLI passes every option, unset ones as None
            given["forward"] = _training_step
        self.options = MFUOptions(**given)
        self.session = MeterSession(
            self.options,
            "mfu_callbacks.lightning.MFUCallback",
            wandb_step_metric="trainer/global_step",
            warn=rank_zero_warn,
        )
        # Logging has a guard of its own: after the meter's failure, rows still carry mfu_status.
        self._log_guard = Guard("mfu_callbacks.lightning.MFUCallback", stops="logging MFU")
        self._optimizer_stepped = False
        self._logged_by_us: set[str] = set()  # the names this callback logged (Lightning keeps them)
        self.summary: dict[str, float] = {}

    @entry_point()
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.start_run()  # a second fit(), or one after an interrupted fit, starts clean
        self._log_guard = Guard(self._log_guard.owner, stops=self._log_guard.stops)
        self._optimizer_stepped = False
        self._logged_by_us = set()
        self.session.write_summary_to(trainer.log_dir)
        if trainer.global_step > 0:  # resumed from a checkpoint
            self.session.continue_from_step(trainer.global_step)
        dtype = dtype_from_lightning_precision(str(trainer.precision))
        self.session.attach(pl_module, dtype=dtype)

    @entry_point()
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.session.step_open:
            self.session.add_batch(batch)  # gradient accumulation: another micro-batch of the step
        else:
            self.session.begin_step(batch)

    @entry_point()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._optimizer_stepped = (
            True  # the step ends with this batch, whatever the accumulation or epoch end
        )

    @entry_point()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._optimizer_stepped:
            return  # gradient accumulation: the optimizer has not stepped yet
        self._optimizer_stepped = False
        self.session.end_step()
        if not self.session.due(lightning_writes_logs_now(trainer)):
            return
        metrics = self.session.read()
        if metrics:
            self._log_guard.run(self._log_beside, trainer, pl_module, metrics)

    def _log_beside(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        """Log ``metrics``, beside (never over) the names logged by the module or another callback."""
        placed = self.session.beside(names_logged_by_others(trainer, self._logged_by_us), metrics)
        self._logged_by_us.update(placed)
        self._log(pl_module, placed)

    @entry_point()
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.pause()  # validation is not training: neither step time nor input wait

    @entry_point()
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.resume()

    @entry_point()
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.session.pause()  # until the next training batch: no hook follows the write

    @entry_point()
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.summary = self.session.finish()

    @entry_point()
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.session.unwatch()

    @entry_point(default=dict)
    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the meter's run totals, so a resumed fit continues this run's summary.

        Lightning asks every callback's state first when it saves: the save's pause starts here, before
        any callback's ``on_save_checkpoint`` work.
        """
        self.session.pause()
        return self.session.state_dict()

    @entry_point()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict, when_attached=True)  # restored before on_train_start

    @staticmethod
    def _log(pl_module: LightningModule, metrics: dict[str, float]) -> None:
        pl_module.log_dict(
            metrics, on_step=True, on_epoch=False, prog_bar=False, sync_dist=False, rank_zero_only=False
        )


def names_logged_by_others(trainer: Trainer, ours: set[str]) -> set[str]:
    """The names logged with ``self.log`` in this fit so far by anyone but us (``ours``: the names we
    logged from ``on_train_batch_end``), read from Lightning's result collection without computing
    any value (no sync). Two hooks logging one name would reach the loggers as one column, the later
    value replacing the earlier."""
    results = getattr(trainer, "_results", None)  # the running loop's results (Lightning 2.x)
    if results is None:
        return set()
    return {
        metric.meta.name
        for metric in list(results.values())
        if not (metric.meta.fx == "on_train_batch_end" and metric.meta.name in ours)
    }


def lightning_writes_logs_now(trainer: Trainer) -> bool:
    """Whether Lightning writes the step's logs to its loggers, asked at ``on_train_batch_end`` of a
    batch on which the optimizer stepped (automatic optimization), from public Trainer state.

    Lightning writes them when the count of optimizer steps is a multiple of ``log_every_n_steps``
    (0 turns step logging off), when training is about to stop, and on every step of a
    ``fast_dev_run``. At this moment ``global_step`` already counts this batch's optimizer step.
    """
    # fast_dev_run and log_every_n_steps are set on the Trainer by Lightning's setup code, never declared in its class
    if trainer.fast_dev_run:  # type: ignore[attr-defined]
        return True
    if trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
        return False
    return trainer.global_step % trainer.log_every_n_steps == 0 or trainer.should_stop  # type: ignore[attr-defined]
