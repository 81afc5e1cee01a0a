"""The meter's hot path: bracket each optimizer step, count its micro-batches, never wait for the GPU.

The FLOP engine is built from the first batch that can be counted (that step's time went into
building it and is left out). A batch the engine cannot count costs its own step, not the run:
the step is left out of timing and counts, once said in the log.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ._step_counts import StepCounts
from .flops import BatchError, FlopEngine, Forward, TokenCounter
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
    ) -> None:
        self.engine = engine
        self.timer = timer
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
        self.step_open = True
        self._left_out = False
        self.timer.start()
        if batch is not None:
            self._count(batch)

    def add_batch(self, batch: Any) -> None:
        if not self.step_open:
            raise ValueError(
                "add_batch() called outside a step: call start_step() at the beginning of each optimizer step"
            )
        if batch is None:
            raise TypeError("add_batch() needs the micro-batch the model was given, got None")
        self._count(batch)

    def end_step(self) -> None:
        if not self.step_open:
            raise ValueError(
                "end_step() called without start_step(): call start_step() at the beginning of each optimizer step"
            )
        self.step_open = False
        if self.timer.measuring:
            self._unread += 1
            self._counts.end_step()
        self.timer.stop()

    def take(self) -> tuple[list[StepTiming], tuple[torch.Tensor, torch.Tensor] | None]:
        """The finished steps' timings and (window, last step) feature sums on the host; clears them.

        Counts are None when no engine counted anything. Waits for the GPU (CUDA events): log time only.
        """
        timings = self.timer.read()
        steps = sum(timing.steps for timing in timings)
        if steps != self._unread:
            raise RuntimeError(f"the timer reported {steps} steps but the meter counted {self._unread}")
        self._unread = 0
        counted = self._counts.take(self.step_open) if steps and self.engine is not None else None
        return timings, counted

    def _count(self, batch: Any) -> None:
        if self._left_out:
            return
        try:
            if self.engine is None:
                self.engine = FlopEngine.from_model(
                    self._model, batch, forward=self._forward, token_counter=self._token_counter
                )
                self.timer.discard_current()  # this step's time went into building the engine, not into training
                return
            if self.timer.measuring:
                self._counts.add(self.engine.count(batch))
        except (BatchError, ValueError) as error:
            self._leave_step_out(error)

    def _leave_step_out(self, error: Exception) -> None:
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
