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

from ._step_counts import StepCounts
from .flops import (
    OBSERVATION_ATTEMPTS,
    BatchError,
    FlopEngine,
    Forward,
    ModelIntrospectionError,
    RealStepObserver,
    TokenCounter,
    TokenCounting,
    copy_engine,
    counting_decision,
    fit_observation,
    is_compiled,
    is_sharded,
    observe_step,
    start_observation,
)
from .timer import StepTimer, StepTiming

logger = logging.getLogger("mfu_callbacks")


class StepRecorder:
    """Timings and token counts of the measured steps since the last ``take``."""

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
        # What this run counts with: the user's ``real_step`` until the first build decides
        # (``counting_decision``), "off" once the copy's count stands unchecked.
        self._decision = real_step if engine is None else "off"
        self._token_counting: TokenCounting | None = None  # built for an observed step, before any engine
        self._observer: RealStepObserver | None = None
        self._observed: tuple[RealStepObserver, torch.Tensor | None] | None = (
            None  # awaiting its fit at the next read
        )
        self._observations_left = OBSERVATION_ATTEMPTS
        self._awaiting = (
            False  # the open observation began at a forward without grad: its micro-batch is next
        )
        self._trained = False  # the open step has had a training micro-batch
        self.step_open = False
        self.steps_left_out = 0
        self._model = model
        self._forward = forward
        self._token_counter = token_counter
        self._counts = StepCounts()
        self._left_out = False  # the open step had a batch the engine cannot count
        self._unread = 0  # measured steps finished since the last take

    @property
    def unread_steps(self) -> int:
        """Measured steps finished since the last ``take``."""
        return self._unread

    def start_step(self, batch: Any = None) -> None:
        if self.step_open:
            raise ValueError(
                "start_step() called while a step is open: call end_step() after each optimizer step"
            )
        self._close_observation()
        self.step_open = True
        self._left_out = False
        self._trained = False
        self.timer.start()
        if batch is not None:
            self._count(batch)

    @property
    def ready_to_profile(self) -> bool:
        """Whether a step can be profiled now: the FLOP engine exists and no real step is being observed."""
        return self.engine is not None and self._observer is None

    def leave_step_out(self) -> None:
        """Leave the open step out of timings and counts (it does one-off work: a profile)."""
        if self.timer.measuring:
            self._counts.discard_step()
        self._left_out = True
        self.timer.discard_current()

    def add_batch(self, batch: Any) -> None:
        if not self.step_open:
            raise ValueError(
                "add_batch() called outside a step: call start_step() at the beginning of each optimizer step"
            )
        if batch is None:
            raise TypeError("add_batch() needs the micro-batch the model was given, got None")
        if self._awaiting:
            self._adopt(batch)
        else:
            self._close_observation()
            self._count(batch)
        self._trained = True

    def add_forward(self, batch: Any, *, other_model: bool = False) -> None:
        """A forward without grad inside the open step (a reference, KL or scoring pass): no micro-batch
        of its own. Before the step's first training micro-batch, where this step is to be observed,
        the observation opens here, so that it covers this pass; the next training micro-batch is the
        one it is fitted to.

        ``other_model``: a pass of a model the meter does not watch (a reference model the trainer
        built). Where its batch cannot open the observation, nothing is left out: the step's training
        micro-batch opens it, as without that pass."""
        if not self.step_open or self._trained or self._left_out or self._observer is not None:
            return
        if isinstance(batch, dict) and batch.get("past_key_values") is not None:
            return  # a generation step: not a pass of the training step's own
        if self._counter is not None and not self._observing_again():
            return
        try:
            if self._counter is None:
                self._build(batch, awaiting=True)
            else:
                self._observe(batch, awaiting=True)
        except Exception as error:  # noqa: BLE001 - another model's batch only ever costs its own try
            if other_model:
                self._close_observation()
                logger.info("mfu_callbacks: a pass of another model is not observed (%s)", error)
            elif isinstance(error, (BatchError, ValueError)):
                self._leave_step_out(error)
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
            and self._observer is None
            and self._decision != "off"
            and (self._counter is None or self._observing_again())
            and not (is_compiled(self._model) or is_sharded(self._model))
        )

    def _observing_again(self) -> bool:
        """Whether the next micro-batch is observed again (an earlier observation saw no backward)."""
        return (
            self._decision != "off"
            and bool(self._observations_left)
            and self.engine is None
            and not self._observed
        )

    def _adopt(self, batch: Any) -> None:
        """The first training micro-batch of a step whose observation opened at a forward without grad."""
        self._awaiting = False
        observer, counting = self._observer, self._token_counting
        if observer is None or counting is None:  # it closed (the pass raised): observed again later
            self._observed = None
            self._count(batch)
            return
        try:
            observe_step(self._model, batch, counting)  # the checks a batch is observed with
            observer.add_batch(batch)
            self._observed = (observer, counting.count(batch))
        except (BatchError, ValueError, ModelIntrospectionError) as error:
            self._close_observation()
            self._observed = None
            if self.engine is None:
                self._leave_step_out(error)

    def end_step(self) -> None:
        if not self.step_open:
            raise ValueError(
                "end_step() called without start_step(): call start_step() at the beginning of each optimizer step"
            )
        self._close_observation()
        self.step_open = False
        if self.timer.measuring:
            self._unread += 1
            self._counts.end_step()
        self.timer.stop()

    def take(self, *, wait: bool = True) -> tuple[list[StepTiming], tuple[torch.Tensor, torch.Tensor] | None]:
        """The finished steps' timings and (window, last step) feature sums on the host; clears them.

        Counts are None when no engine counted anything. ``wait=False`` takes only the steps the
        device has finished (CUDA events already passed) and leaves the others for the next take, so
        nothing waits for the GPU; with ``wait`` every finished step is taken (the end of a run).
        """
        steps = self.timer.unread_steps if wait else self.timer.completed_steps()
        steps = self._counts.step_boundary(steps)  # a stretch of folded counts is taken whole
        if self.timer.unread_steps != self._unread:
            raise RuntimeError(
                f"the timer holds {self.timer.unread_steps} unread steps but the meter counted {self._unread}"
            )
        self._fit_observation()
        counted = self._counts.take(steps, ready=self.timer.end_event(steps)) if steps else None
        timings = self.timer.read(steps)
        self._unread -= steps
        # Without an engine yet (the real step not observed in full: it is tried again), the window's
        # counts go with its timings: neither is measured.
        return timings, counted if self.engine is not None else None

    def _count(self, batch: Any) -> None:
        if self._left_out:
            return
        try:
            counter = self._counter
            if counter is None:
                self._build(batch)
                return
            if self._observing_again():
                self._observe(batch)  # an earlier observation saw no backward: try again
                return
            if self.timer.measuring:  # features later, at the read (``_step_counts.py``)
                self._counts.add_deferred(*counter.defer(batch))
        except (BatchError, ValueError) as error:
            self._leave_step_out(error)

    @property
    def _counter(self) -> FlopEngine | TokenCounting | None:
        """What reduces a batch to features: the engine (a ready-made one included), else the counting
        of a real step being observed before any engine exists."""
        return self.engine if self.engine is not None else self._token_counting

    # -- building the engine (the policy: ``flops/build.py``) ----------------------------------------
    def _build(self, batch: Any, *, awaiting: bool = False) -> None:
        """From the first countable batch: the copy's engine and/or an observation of this step
        (``awaiting``: the batch of a forward without grad, before the step's first training one)."""
        self.timer.discard_current()  # this step's time goes into building the engine, not into training
        self._decision = counting_decision(self._model, self._decision)
        self.engine = copy_engine(
            self._model, batch, self._decision, forward=self._forward, token_counter=self._token_counter
        )
        if self._decision == "off":
            return
        try:
            self._observe(batch, awaiting=awaiting)
        except Exception as error:  # noqa: BLE001 - the check is optional where the copy counted
            if self.engine is None:
                raise
            self._decision = "off"  # the copy's count stands unchecked
            logger.info("mfu_callbacks: the real step cannot be observed (%s)", error)

    def _observe(self, batch: Any, *, awaiting: bool = False) -> None:
        """Watch this micro-batch's forward and backward (until the recorder's next event); with
        ``awaiting``, from this forward without grad on, fitted to the next training micro-batch."""
        observing = start_observation(
            self._model, batch, self._token_counting, self._token_counter, awaiting=awaiting
        )
        self._token_counting = observing.counting
        self._observations_left -= 1
        self.timer.discard_current()  # the observed step runs slower: left out of timing
        observing.observer.__enter__()
        self._observer, self._observed, self._awaiting = (
            observing.observer,
            (observing.observer, observing.features),
            awaiting,
        )

    def stop_observing(self) -> None:
        """Leave the real step's dispatch mode now (the run ended or failed before the recorder's next event)."""
        self._close_observation()

    def _close_observation(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.__exit__(None, None, None)
        if self._awaiting:  # no training micro-batch came: nothing to fit
            self._awaiting = False
            self._observed = None

    def _fit_observation(self) -> None:
        """Fit the observed step (at a read: its features are read back with the rest) and settle
        which count the run uses."""
        self._close_observation()
        observed, self._observed = self._observed, None
        if observed is None:
            return
        observer, features = observed
        assert self._token_counting is not None and features is not None
        engine = fit_observation(
            self._model,
            observer,
            self._token_counting,
            features,
            self.engine,
            attempts_left=self._observations_left,
        )
        if engine is not None:
            self.engine = engine

    def _leave_step_out(self, error: Exception) -> None:
        self._close_observation()
        self._left_out = True
        self.steps_left_out += 1
        if self.timer.measuring:
            self._counts.discard_step()
        self.timer.discard_current()
        if self.steps_left_out == 1:
            logger.warning(
                "mfu_callbacks: a step was left out of the measurement, its batch could not be "
                "counted (%s); measuring goes on with the next step",
                error,
            )
