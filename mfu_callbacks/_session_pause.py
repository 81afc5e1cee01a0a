"""What is not training, between two steps (evaluation runs, checkpoint saves): ``MeterSession``'s pause,
a part of its interface on its own (a mixin, as Lightning's ``LightningModule`` is made of
``ModelHooks``, ``DataHooks`` and ``CheckpointHooks``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from ._guard import Guard
from .meter import MFUMeter


class PauseHooks:
    """The pause methods of ``MeterSession``: the meter's ``not_training`` held open until ``resume``."""

    meter: MFUMeter | None
    guard: Guard
    _pause: AbstractContextManager[None] | None  # open while evaluating or saving

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
