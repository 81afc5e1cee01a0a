"""Activation checkpointing in the copy's trace: which recorded matmuls the backward runs again.

A mixin of ``MatmulRecorder`` (``trace.py``): the recorder adds each matmul it records to the open
region (``regions``), and each tensor autograd saves (``note_saved``); a region that closes adds what
torch's checkpoint reruns to the recompute FLOPs of their components.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch


class Recorded(Protocol):
    """A recorded matmul, as a region sees it."""

    component: str
    forward: float
    share: float


class RecomputeRegions:
    """Open checkpoint regions, innermost last, and the recompute FLOPs per component."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._regions: list[
            list[Any]
        ] = []  # per open region: its matmuls (Recorded), None where a tensor was saved
        self._recompute: dict[str, float] = defaultdict(float)

    # -- activation checkpointing ---------------------------------------------------------------
    def checkpoint_reentrant(self, function: Callable, *args):
        """Stands in for torch's reentrant checkpoint (``checkpoint(..., use_reentrant=True)``).

        The real one runs the region without autograd; its backward reruns all of it, and only
        when one of its tensor arguments requires a gradient (parameters inside do not count: with
        none, the output requires no gradient and nothing inside gets a backward).
        """
        backward_runs = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        )
        with (
            self.recompute_region(early_stop=False, backward_runs=backward_runs),
            torch.set_grad_enabled(backward_runs),
        ):
            return function(*args)

    @contextmanager
    def recompute_region(self, *, early_stop: bool, backward_runs: bool | None = None) -> Iterator[None]:
        """Ops inside run again in the backward pass, as far as torch's checkpoint reruns them.

        Non-reentrant checkpoint (the default of transformers and torch) recomputes when the
        backward first unpacks a tensor the region saved, so it reruns nothing if autograd saved
        nothing there (``backward_runs=None`` decides from that). With ``early_stop`` (torch's
        default) it stops as soon as the last tensor saved in the forward is saved again: a matmul
        whose inputs are the last saved tensors (autograd saves inputs before the op runs) and the
        ops after it are not rerun, e.g. a layer's final projection when only a residual add follows.
        So each region records, in order, its matmuls and the moments autograd saves a tensor.
        """
        events: list[Recorded | None] = []  # a matmul, or None where autograd saved a tensor
        self._regions.append(events)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._saved, _unpacked):
                yield
        finally:
            self._regions.pop()
            saves = [index for index, event in enumerate(events) if event is None]
            if backward_runs is None:
                backward_runs = bool(saves)
            if backward_runs:
                end = (saves[-1] if saves else 0) if early_stop else len(events)
                for event in events[:end]:
                    if event is not None:
                        self._recompute[event.component] += event.forward * event.share
            if self._regions:  # a nested region is recomputed as part of the outer one too
                self._regions[-1].extend(events)

    def _saved(self, tensor: torch.Tensor) -> torch.Tensor:
        self.note_saved()
        return tensor

    def note_saved(self) -> None:
        """Autograd saved a tensor for the backward (called by the pack hook, and by substitutes)."""
        if self._regions:
            self._regions[-1].append(None)


def _unpacked(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
