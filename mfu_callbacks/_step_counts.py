"""The token counts of the steps not yet read, kept on the batch's device in bounded memory.

Each step adds its micro-batches' feature vectors (``FlopEngine.count``) into one row of a small
device buffer: a view's in-place add, so the hot path launches one kernel and never waits for the
GPU. When the rows run out before the next read, the finished rows are folded into one sum on the
device, so memory stays the same however long a run goes without reading its metrics.
"""

from __future__ import annotations

import torch

ROWS = 64  # steps between folds


class StepCounts:
    """Feature sums per step since the last read; ``take`` returns the window's sum and its last step."""

    def __init__(self, rows: int = ROWS) -> None:
        if rows < 2:
            raise ValueError(f"StepCounts needs at least 2 rows, got {rows}")
        self._capacity = rows
        self._rows: torch.Tensor | None = None  # (rows, 2, NUM_FEATURES), allocated at the first count
        self._views: list[torch.Tensor] = []  # one view per row, so the hot path does no indexing
        self._folded: torch.Tensor | None = None  # sum of the rows folded away since the last read
        self._current = 0  # the row of the open (or next) step
        self._dirty = False  # whether the current row holds anything

    def add(self, features: torch.Tensor) -> None:
        """Add one micro-batch's features to the open step."""
        if self._rows is None:
            self._rows = torch.zeros(
                (self._capacity, *features.shape), dtype=features.dtype, device=features.device
            )
            self._views = list(self._rows.unbind(0))
        row = self._views[self._current]
        if features.device != row.device:
            features = features.to(row.device, non_blocking=True)
        row.add_(features)
        self._dirty = True

    def discard_step(self) -> None:
        """Forget what the open step counted (it is left out of the measurement)."""
        if self._dirty:
            self._views[self._current].zero_()
            self._dirty = False

    def end_step(self) -> None:
        """The open step is finished: the next one counts into the next row (folding when full)."""
        self._dirty = False
        self._current += 1
        if self._current < self._capacity or self._rows is None:
            return
        # Keep the last step's row (its FLOPs are logged alone), fold the rest.
        folded = self._rows[:-1].sum(0)
        self._folded = folded if self._folded is None else self._folded.add_(folded)
        self._rows[0].copy_(self._rows[-1])
        self._rows[1:].zero_()
        self._current = 1

    def take(self, step_open: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum of the finished steps, the last finished step) on the host, with one device-to-host copy,
        and clears them; the open step keeps what it has counted. None when nothing was counted."""
        if self._rows is None:
            return None
        finished = self._current
        window = self._rows[:finished].sum(0)
        if self._folded is not None:
            window = window + self._folded
        last = self._rows[finished - 1] if finished else torch.zeros_like(window)
        on_host = torch.stack([window, last]).cpu()
        if step_open and self._dirty:
            self._rows[0].copy_(self._rows[finished])
        self._rows[1 if step_open and self._dirty else 0 :].zero_()
        self._folded = None
        self._current = 0
        return on_host[0], on_host[1]
