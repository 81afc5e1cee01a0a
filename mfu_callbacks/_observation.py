"""The real step under observation: opened at a micro-batch (or at a forward without grad before it),
closed at the recorder's next event, fitted at the next read (``flops/observe.py``; the policy is
``flops/build.py``'s). The recorder decides when; this holds what one observation needs meanwhile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .flops import (
    OBSERVATION_ATTEMPTS,
    BatchError,
    FlopEngine,
    ModelIntrospectionError,
    RealStepObserver,
    TokenCounter,
    TokenCounting,
    fit_observation,
    observe_step,
    start_observation,
)
from .timer import StepTimer


class StepObservation:
    """Whether the run observes its real step, the open observation (its dispatch mode entered), the
    one awaiting its fit, and the tries left."""

    def __init__(
        self, model: nn.Module, timer: StepTimer, token_counter: TokenCounter | None, decision: str
    ) -> None:
        self._model = model
        self._timer = timer
        self._token_counter = token_counter
        self.counting: TokenCounting | None = None  # built for an observed step, before any engine
        self.observer: RealStepObserver | None = None  # open: inside its dispatch mode
        self.observed: tuple[RealStepObserver, torch.Tensor | None] | None = None  # awaiting its fit
        # Whether the run observes its real step: the user's ``real_step`` until the first build decides
        # (``counting_decision``), "off" once the copy's count stands unchecked.
        self.decision = decision
        self.attempts_left = OBSERVATION_ATTEMPTS
        self.awaiting = False  # it began at a forward without grad: its micro-batch is next

    @property
    def pending(self) -> bool:
        """Whether an observation is open or awaits its fit (the run's engine may still change)."""
        return self.observer is not None or self.observed is not None

    def tries_again(self, engine: FlopEngine | None) -> bool:
        """Whether the next micro-batch is observed again (an earlier observation saw no backward)."""
        return engine is None and self.decision != "off" and bool(self.attempts_left) and not self.observed

    def open(self, batch: Any, *, awaiting: bool = False) -> None:
        """Watch this micro-batch's forward and backward (until the recorder's next event); with
        ``awaiting``, from this forward without grad on, fitted to the next training micro-batch."""
        observing = start_observation(
            self._model, batch, self.counting, self._token_counter, awaiting=awaiting
        )
        self.counting = observing.counting
        self.attempts_left -= 1
        self._timer.leave_out_open_step()  # the observed step runs slower: left out of timing
        observing.observer.__enter__()
        self.observer, self.observed, self.awaiting = (
            observing.observer,
            (observing.observer, observing.features),
            awaiting,
        )

    def adopt(self, batch: Any) -> bool:
        """The first training micro-batch of a step whose observation opened at a forward without grad:
        what the observation is fitted to. False when it closed before (the pass raised): observed
        again later. A batch that cannot be observed closes it and raises."""
        self.awaiting = False
        observer, counting = self.observer, self.counting
        if observer is None or counting is None:
            self.observed = None
            return False
        try:
            observe_step(self._model, batch, counting)  # the checks a batch is observed with
            observer.add_batch(batch)
            self.observed = (observer, counting.count(batch))
        except (BatchError, ValueError, ModelIntrospectionError):
            self.close()
            self.observed = None
            raise
        return True

    def close(self) -> None:
        """Leave the dispatch mode (the observed micro-batch's backward has ended, or the run)."""
        observer, self.observer = self.observer, None
        if observer is not None:
            observer.__exit__(None, None, None)
        if self.awaiting:  # no training micro-batch came: nothing to fit
            self.awaiting = False
            self.observed = None

    def fit(self, engine: FlopEngine | None) -> FlopEngine | None:
        """Fit the observed step (at a read: its features are read back with the rest): the engine the
        run counts with from now on, or None to keep ``engine``."""
        self.close()
        observed, self.observed = self.observed, None
        if observed is None:
            return None
        observer, features = observed
        assert self.counting is not None and features is not None
        return fit_observation(
            self._model, observer, self.counting, features, engine, attempts_left=self.attempts_left
        )
