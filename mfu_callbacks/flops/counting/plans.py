"""A batch layout's plan: one small tensor taken per micro-batch on the training step, its features later.

A batch's features (``features.py``) split into what the host knows from shapes alone (rows, computed
tokens, full squares, calls: Python ints, no kernel) and what depends on the batch's values (real
lengths, documents, trailing pads). On the training step only one operation runs per micro-batch
(in most layouts): it reduces or copies what the values part needs into a tensor the meter owns
(``Plan.take``), so a loop that refills a static input buffer cannot change a count afterwards. The
values become features later, where the host waits for the GPU anyway, for many micro-batches at
once (``Group.reduce``): the owned tensors of one group are concatenated along their first dimension
and reduced in a few operations, whatever the number of micro-batches. ``layouts.py`` makes the plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..features import NUM_FEATURES

WIDTH = 2 * NUM_FEATURES  # a feature tensor, flattened: the MODEL row, then the HARDWARE row

Derived = dict[str, torch.Tensor]  # per-row quantities read from concatenated owned tensors
Column = Callable[[Derived], torch.Tensor]  # one per-row int64 value, summed into a feature cell
# A host constant, or a function of a derived quantity (named) giving per-row values.
Term = int | tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def cell(row: int, feature: int) -> int:
    """The index of a feature of row MODEL or HARDWARE in a flattened feature tensor."""
    return row * NUM_FEATURES + int(feature)


@dataclass(frozen=True)
class Source:
    """One owned tensor of a group: what per-row quantities it gives, and the columns read from them.

    ``whole``: the owned tensors are feature rows already (an engine's ``count``, a folded sum).
    """

    derive: Callable[[torch.Tensor], Derived]
    columns: tuple[tuple[int, Column], ...]  # (flattened cell, per-row value): values of a cell add
    whole: bool = False

    def values(self, joined: torch.Tensor) -> torch.Tensor:
        """(rows, columns) int64 values of the concatenated owned tensors."""
        if self.whole:
            return joined
        derived = self.derive(joined)
        functions = [function for _, function in self.columns]
        if len(functions) == 1:
            return functions[0](derived).unsqueeze(1)
        return torch.stack([function(derived) for function in functions], dim=1)


@dataclass(eq=False)
class Group:
    """Batches whose owned tensors concatenate and reduce alike: one per layout and device."""

    sources: tuple[Source, ...]
    device: torch.device
    _index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def cells(self) -> tuple[int, ...]:
        """The flattened cells of ``reduce``'s columns, in order (a cell may repeat: its values add)."""
        return tuple(c for source in self.sources for c, _ in source.columns)

    def reduce(
        self, owned: list[tuple[torch.Tensor, ...]], last_from: tuple[int, ...] | None
    ) -> torch.Tensor:
        """Column sums over the owned tensors of many batches (oldest first): a (1, cells) int64 tensor,
        or (2, cells) with ``last_from``, the first-dimension offsets where the last step's begin, whose
        sums make the second row. A few operations per source, however many batches."""
        totals, lasts = [], []
        for slot, source in enumerate(self.sources):
            tensors = [item[slot] for item in owned]
            values = source.values(tensors[0] if len(tensors) == 1 else torch.cat(tensors))
            totals.append(values.sum(0))
            if last_from is not None:
                # A window of one step (a log at every step) is its own last step: no second sum.
                lasts.append(totals[-1] if last_from[slot] == 0 else values[last_from[slot] :].sum(0))
        rows = [torch.cat(totals) if len(totals) > 1 else totals[0]]
        if last_from is not None:
            rows.append(torch.cat(lasts) if len(lasts) > 1 else lasts[0])
        return torch.stack(rows)

    def index(self) -> torch.Tensor:
        """The cells as an int64 tensor on the device (made once)."""
        if self._index is None:
            self._index = filled(self.cells, self.device)
        return self._index


def filled(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``, built with fills: ``tensor[i] = v`` copies a host
    scalar, which syncs."""
    tensor = torch.zeros(len(values), dtype=torch.int64, device=device)
    for slot, value in enumerate(values):
        if value:
            tensor[slot : slot + 1].fill_(value)
    return tensor


@dataclass(frozen=True)
class StreamShape:
    """Rows and sequence length of a token stream."""

    rows: int
    length: int


def nothing(batch: Any) -> tuple[torch.Tensor, ...]:
    return ()


@dataclass(eq=False)
class Plan:
    """Everything decided about batches of one layout (keys, shapes, dtypes, device), made once."""

    rows: int
    device: torch.device
    constants: tuple[int, ...]  # the host-known part of the flattened features
    take: Callable[[Any], tuple[torch.Tensor, ...]] = nothing  # the hot path: the owned tensors
    group: Group | None = None  # how the owned tensors become the rest; None: nothing to take
    sizes: tuple[int, ...] = ()  # first dimension of each owned tensor
    nbytes: int = 0  # memory the owned tensors hold
    shape: tuple[int, ...] = (2, NUM_FEATURES)
    main: StreamShape | None = None
    decoder: StreamShape | None = None
    _host_known: torch.Tensor | None = field(default=None, repr=False)  # the constants on the device

    def features(self, owned: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """This batch's features now, on its device, with no host sync."""
        if self._host_known is None:
            self._host_known = filled(self.constants, self.device)
        if self.group is None:
            return self._host_known.clone().view(self.shape)
        values = self.group.reduce([owned], None)[0]
        return self._host_known.index_add(0, self.group.index(), values).view(self.shape)


def _features(joined: torch.Tensor) -> Derived:
    return {"features": joined}


def whole_plan(width: int, shape: tuple[int, ...], device: torch.device) -> Plan:
    """Feature rows counted already (an engine's ``count``, a fold's sum), taken whole: one row of
    ``width`` values per owned tensor."""
    source = Source(_features, tuple((c, _features_column) for c in range(width)), whole=True)
    return Plan(
        rows=0,
        device=device,
        constants=(0,) * width,
        group=Group((source,), device),
        sizes=(1,),
        nbytes=8 * width,
        shape=shape,
    )


def constant_plan(constants: list[int], shape: tuple[int, ...], device: torch.device) -> Plan:
    """Features the host knows alone (the host-known part of folded steps)."""
    return Plan(rows=0, device=device, constants=tuple(constants), shape=shape)


def _features_column(derived: Derived) -> torch.Tensor:  # pragma: no cover - whole sources skip columns
    raise AssertionError("feature rows are read whole")
