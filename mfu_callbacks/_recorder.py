"""The meter's hot path: bracket each optimizer step, count its micro-batches, never wait for the GPU.

The FLOP engine is built from the first batch that can be counted (that step's time went into
building it and is left out). A batch the engine cannot count costs its own step, not the run:
the step is left out of timing and counts, once said in the log.

With ``real_step="check"`` (the default) the same first step also runs under the real-step
observer (``flops/observe.py``; the policy is ``flops/build.py``'s): its count checks the meta-device
copy's, and replaces it when the copy cannot be traced or disagrees by more than 0.5%. The observation is fitted at the next read,
where the host waits for the GPU anyway; until then the steps' features are counted as usual.

Only training forwards (grad on) are micro-batches with features of their own. The forwards without
grad inside a step (a reference model, adapters disabled, a KL or scoring pass) are counted through
the observation: it opens at the step's first forward of the model, with grad or without, covers every
forward until the observed micro-batch's backward ends (those of models the callback does not watch
too), and is fitted per feature of that micro-batch. Later steps then count that work in proportion
to their training batches: exact where the passes run on the same tokens (DPO's reference does).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ._observation import StepObservation
from ._step_counts import StepCounts
from .flops import (
    BatchError,
    FlopEngine,
    Forward,
    ModelIntrospectionError,
    TokenCounter,
    TokenCounting,
    copy_engine,
    counting_decision,
    is_compiled,
    is_sharded,
)
from .timer import StepTimer, StepTiming

logger = logging.getLogger("mfu_callbacks")


class StepRecorder:
    """Timings and token counts of the measured steps since the last ``drain``."""

    def __init__(
        self,
        model: nn.Module,
        timer: StepTimer,
        engine: FlopEngine | None,
        forward: Forward | None,
        token_counter: TokenCounter | None,
        real_step: str = "check",
    ) -> None:
        self.engine = engine
        self.timer = timer
        decision = real_step if engine is None else "off"  # a ready-made engine is not checked
        self._observation = StepObservation(model, timer, token_counter, decision)
        self._trained = False  # the open step has had a training micro-batch
        self.step_open = False
        self.steps_left_out = 0
        self._model = model
        self._forward = forward
        self._user_token_counter = token_counter  # the ``token_counter`` option, given to the engine
        self._step_counts = StepCounts()
        self._left_out = False  # the open step had a batch the engine cannot count
        self._unread = 0  # measured steps finished since the last drain

    @property
    def unread_steps(self) -> int:
        """Measured steps finished since the last ``drain``."""
        return self._unread

    def start_step(self, batch: Any = None) -> None:
        if self.step_open:
            raise ValueError(
                "start_step() called while a step is open: call end_step() after each optimizer step"
            )
        self._observation.close()
        self.step_open = True
        self._left_out = False
        self._trained = False
        self.timer.start()
        if batch is not None:
            self._count_batch(batch)

    @property
    def ready_to_profile(self) -> bool:
        """Whether a step can be profiled now: the FLOP engine exists and no real step is being observed."""
        return self.engine is not None and self._observation.observer is None

    def leave_out_open_step(self) -> None:
        """Leave the open step out of timings and counts (it does one-off work: a profile)."""
        if self.timer.measuring:
            self._step_counts.leave_out_open_step()
        self._left_out = True
        self.timer.leave_out_open_step()

    def add_batch(self, batch: Any) -> None:
        if not self.step_open:
            raise ValueError(
                "add_batch() called outside a step: call start_step() at the beginning of each optimizer step"
            )
        if batch is None:
            raise TypeError("add_batch() needs the micro-batch the model was given, got None")
        if self._observation.awaiting:
            self._adopt(batch)
        else:
            self._observation.close()
            self._count_batch(batch)
        self._trained = True

    def add_forward(self, batch: Any, *, other_model: bool = False) -> None:
        """A forward without grad inside the open step (a reference, KL or scoring pass): no micro-batch
        of its own. Before the step's first training micro-batch, where this step is to be observed,
        the observation opens here, so that it covers this pass; the next training micro-batch is the
        one it is fitted to.

        ``other_model``: a pass of a model the meter does not watch (a reference model the trainer
        built). Where its batch cannot open the observation, nothing is left out: the step's training
        micro-batch opens it, as without that pass."""
        if not self.step_open or self._trained or self._left_out or self._observation.observer is not None:
            return
        if isinstance(batch, dict) and batch.get("past_key_values") is not None:
            return  # a generation step: not a pass of the training step's own
        if self._feature_source is not None and not self._observation.tries_again(self.engine):
            return
        try:
            if self._feature_source is None:
                self._build(batch, awaiting=True)
            else:
                self._observation.open(batch, awaiting=True)
        except Exception as error:  # noqa: BLE001 - another model's batch only ever costs its own try
            if other_model:
                self._observation.close()
                logger.info("mfu_callbacks: a pass of another model is not observed (%s)", error)
            elif isinstance(error, (BatchError, ValueError)):
                self._leave_out_uncountable(error)
            else:
                raise

    @property
    def awaits_first_pass(self) -> bool:
        """Whether a forward without grad would open the open step's observation now: the step is to be
        observed and nothing of it ran yet (the real step of a compiled or sharded model never is)."""
        return (
            self.step_open
            and not self._trained
            and not self._left_out
            and self._observation.observer is None
            and self._observation.decision != "off"
            and (self._feature_source is None or self._observation.tries_again(self.engine))
            and not (is_compiled(self._model) or is_sharded(self._model))
        )

    def _adopt(self, batch: Any) -> None:
        """The first training micro-batch of a step whose observation opened at a forward without grad."""
        try:
            adopted = self._observation.adopt(batch)
        except (BatchError, ValueError, ModelIntrospectionError) as error:
            if self.engine is None:
                self._leave_out_uncountable(error)
            return
        if not adopted:  # it closed (the pass raised): observed again later
            self._count_batch(batch)

    def end_step(self) -> None:
        if not self.step_open:
            raise ValueError(
                "end_step() called without start_step(): call start_step() at the beginning of each optimizer step"
            )
        self._observation.close()
        self.step_open = False
        if self.timer.measuring:
            self._unread += 1
            self._step_counts.end_step()
        self.timer.stop()

    def drain(
        self, *, wait: bool = True
    ) -> tuple[list[StepTiming], tuple[torch.Tensor, torch.Tensor] | None]:
        """The finished steps' timings and (window, last step) feature sums on the host; clears them.

        Counts are None when no engine counted anything. ``wait=False`` drains only the steps the
        device has finished (CUDA events already passed) and leaves the others for the next drain, so
        nothing waits for the GPU; with ``wait`` every finished step is drained (the end of a run).
        """
        steps = self.timer.unread_steps if wait else self.timer.completed_steps()
        steps = self._step_counts.step_boundary(steps)  # a stretch of folded counts is drained whole
        if self.timer.unread_steps != self._unread:
            raise RuntimeError(
                f"the timer holds {self.timer.unread_steps} unread steps but the meter counted {self._unread}"
            )
        engine = self._observation.fit(self.engine)  # and settle which count the run uses
        if engine is not None:
            self.engine = engine
        if isinstance(self.engine, FlopEngine) and not self._observation.pending:
            # The run's engine is settled: batches need not give what it never reads.
            self.engine.counting.count_labelled(self.engine.reads_labelled)
        counted = self._step_counts.drain(steps, ready=self.timer.end_event(steps)) if steps else None
        timings = self.timer.read(steps)
        self._unread -= steps
        # Without an engine yet (the real step not observed in full: it is tried again), the window's
        # counts go with its timings: neither is measured.
        return timings, counted if self.engine is not None else None

    def _count_batch(self, batch: Any) -> None:
        if self._left_out:
            return
        try:
            source = self._feature_source
            if source is None:
                self._build(batch)
                return
            if self._observation.tries_again(self.engine):
                self._observation.open(batch)  # an earlier observation saw no backward: try again
                return
            if self.timer.measuring:  # features later, at the read (``_step_counts.py``)
                self._step_counts.add_deferred(*source.defer(batch))
        except (BatchError, ValueError) as error:
            self._leave_out_uncountable(error)

    @property
    def _feature_source(self) -> FlopEngine | TokenCounting | None:
        """What reduces a batch to features: the engine (a ready-made one included), else the counting
        of a real step being observed before any engine exists."""
        return self.engine if self.engine is not None else self._observation.counting

    # -- building the engine (the policy: ``flops/build.py``) ----------------------------------------
    def _build(self, batch: Any, *, awaiting: bool = False) -> None:
        """From the first countable batch: the copy's engine and/or an observation of this step
        (``awaiting``: the batch of a forward without grad, before the step's first training one)."""
        self.timer.leave_out_open_step()  # this step's time goes into building the engine, not into training
        self._observation.decision = decision = counting_decision(self._model, self._observation.decision)
        self.engine = copy_engine(
            self._model, batch, decision, forward=self._forward, token_counter=self._user_token_counter
        )
        if decision == "off":
            return
        try:
            self._observation.open(batch, awaiting=awaiting)
        except Exception as error:  # noqa: BLE001 - the check is optional where the copy counted
            if self.engine is None:
                raise
            self._observation.decision = "off"  # the copy's count stands unchecked
            logger.info("mfu_callbacks: the real step cannot be observed (%s)", error)

    def stop_observing(self) -> None:
        """Leave the real step's dispatch mode now (the run ended or failed before the recorder's next event)."""
        self._observation.close()

    def _leave_out_uncountable(self, error: Exception) -> None:
        """Leave the open step out: one of its batches cannot be counted (said once in the log)."""
        self._observation.close()
        self._left_out = True
        self.steps_left_out += 1
        if self.timer.measuring:
            self._step_counts.leave_out_open_step()
        self.timer.leave_out_open_step()
        if self.steps_left_out == 1:
            logger.warning(
                "mfu_callbacks: a step was left out of the measurement, its batch could not be "
                "counted (%s); measuring goes on with the next step",
                error,
            )
