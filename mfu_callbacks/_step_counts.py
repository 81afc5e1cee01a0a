"""The token counts of the steps not yet read: what each micro-batch took, turned into features late.

On the training step each micro-batch leaves a plan (its layout's decisions, made once) and the
small tensors it took (``TokenCounting.defer``): one operation on the device, nothing else. At the
read, where the host waits for the GPU anyway, the held micro-batches become features all at once:
per layout a few operations on their concatenated tensors (``layouts.Group.reduce``), whatever the
number of steps, then one device-to-host copy; the host-known part (rows, computed tokens, full
squares) is summed in Python ints. The last finished step is summed apart, for its own FLOPs. A
small window (a log every step or every few steps) is copied to the host as it is and reduced there:
a copy per tensor instead of a kernel launch per reduction, which is most of a read's host time.

Memory stays bounded in a run that never reads: every ``ROWS`` steps (or when the held tensors pass
``MAX_BYTES``) the finished steps but the last are reduced into one feature row on the device,
still without a host sync.

A read drains the oldest steps, as many as the device has finished (``drain(steps, ready=...)``): on
CUDA their reduction runs on a side stream that waits only for the end of those steps, so the copy
to the host does not wait for the steps still queued behind them.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager, nullcontext

import torch

from .flops import Group, Plan, constant_plan, whole_plan

ROWS = 64  # finished steps held before folding
MAX_BYTES = 16 * 2**20  # device memory of held tensors before folding
HOST_REDUCE_BYTES = 256 * 2**10  # a window holding at most this much is reduced on the host

Entry = tuple[Plan, tuple[torch.Tensor, ...]]


class StepCounts:
    """Micro-batches per step since the last read; ``drain`` returns the window's sum and its last step."""

    def __init__(self, rows: int = ROWS, max_bytes: int = MAX_BYTES) -> None:
        if rows < 2:
            raise ValueError(f"StepCounts needs at least 2 rows, got {rows}")
        self._capacity = rows
        self._max_bytes = max_bytes
        self._finished: list[list[Entry]] = []  # oldest first; a folded past is one step of feature rows
        self._steps_in: list[int] = []  # steps each entry of ``_finished`` stands for (a fold: several)
        self._open: list[Entry] = []
        self._bytes = 0  # held by the owned tensors
        self._counted = False  # whether anything was ever added
        self._shape: tuple[int, ...] = ()  # of a feature tensor, from the first micro-batch

    def add_deferred(self, plan: Plan, owned: tuple[torch.Tensor, ...]) -> None:
        """Add one micro-batch to the open step: its plan and what it took (``TokenCounting.defer``)."""
        self._open.append((plan, owned))
        if not self._counted:
            self._counted, self._shape = True, plan.shape
        self._bytes += plan.nbytes
        if self._bytes > self._max_bytes:
            self._shrink()

    def leave_out_open_step(self) -> None:
        """Forget what the open step counted (it is left out of the measurement)."""
        self._bytes -= _bytes(self._open)
        self._open = []

    def end_step(self) -> None:
        """The open step is finished (folding the older steps when the rows run out)."""
        self._finished.append(self._open)
        self._steps_in.append(1)
        self._open = []
        if len(self._finished) >= self._capacity:
            self._fold_finished()

    def step_boundary(self, steps: int) -> int:
        """The fewest finished steps, at least ``steps``, that end with a step of its own: a fold of
        several steps is drained whole, and never last (the last step's FLOPs are logged alone). A fold
        is always followed by a step of its own."""
        if steps <= 0:
            return 0
        total = 0
        for count in self._steps_in:
            total += count
            if total >= steps and count == 1:
                return total
        return total

    def drain(
        self, steps: int | None = None, *, ready: torch.cuda.Event | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum of the oldest ``steps`` finished steps, the last of them) on the host, with one
        device-to-host copy per device, and forgets them; later steps and the open step stay. None
        when nothing was ever counted.

        steps: how many (default: all finished), at a ``step_boundary``.
        ready: a CUDA event recorded after those steps and already passed: the reduction then runs on
            a side stream that waits for it alone, not for the work queued after it.
        """
        entries = len(self._finished) if steps is None else self._entries_for(steps)
        drained, self._finished = self._finished[:entries], self._finished[entries:]
        del self._steps_in[:entries]
        self._bytes = _bytes(self._open) + sum(_bytes(step) for step in self._finished)
        if not self._counted:
            return None
        with _after(ready):
            window, last = _sums(drained, _width(self._shape))
        summed = torch.tensor(window).view(self._shape)
        return summed, summed if last is window else torch.tensor(last).view(self._shape)

    def _entries_for(self, steps: int) -> int:
        entries, total = 0, 0
        while total < steps:
            if entries == len(self._steps_in):
                raise ValueError(f"{steps} steps asked for, {total} finished")
            total += self._steps_in[entries]
            entries += 1
        if total != steps:
            raise ValueError(f"{steps} steps end inside a fold of {self._steps_in[entries - 1]} steps")
        return entries

    # -- folding ------------------------------------------------------------------------------------
    def _fold_finished(self) -> None:
        """All finished steps but the last (whose FLOPs are logged alone) into one step of feature rows."""
        if len(self._finished) > 1:
            self._finished = [_fold(self._finished[:-1], self._shape), self._finished[-1]]
            self._steps_in = [sum(self._steps_in[:-1]), self._steps_in[-1]]
            self._bytes = _bytes(self._open) + sum(_bytes(step) for step in self._finished)

    def _shrink(self) -> None:
        self._fold_finished()
        if self._bytes > self._max_bytes and len(self._open) > 1:  # a step of very many micro-batches
            before = _bytes(self._open)
            self._open = _fold([self._open], self._shape)
            self._bytes += _bytes(self._open) - before


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _after(ready: torch.cuda.Event | None) -> AbstractContextManager[object]:
    """Run inside on a side stream of the event's device that waits for ``ready`` (nothing without one)."""
    if ready is None:
        return nullcontext()
    device = torch.device("cuda", torch.cuda.current_device())
    stream = _side_streams.get(device)
    if stream is None:
        # High priority: its few small kernels are scheduled ahead of the training kernels' next blocks,
        # so the copy to the host waits for them alone, not for a long kernel of the step queued before.
        stream = _side_streams[device] = torch.cuda.Stream(device, priority=-1)
    stream.wait_event(ready)
    return torch.cuda.stream(stream)


def _bytes(step: list[Entry]) -> int:
    return sum(plan.nbytes for plan, _ in step)


def _width(shape: tuple[int, ...]) -> int:
    width = 1
    for size in shape:
        width *= size
    return width


def _grouped(
    steps: list[list[Entry]], with_last: bool
) -> tuple[Counter[Plan], Counter[Plan], dict[Group, list[tuple[torch.Tensor, ...]]], dict[Group, list[int]]]:
    """Micro-batches per plan (all steps, and the last step), the owned tensors per group in step
    order, and per group the offsets (per owned tensor) where the last step's begin."""
    plans: Counter[Plan] = Counter()
    last_plans: Counter[Plan] = Counter()
    owned: dict[Group, list[tuple[torch.Tensor, ...]]] = {}
    sizes: dict[Group, list[int]] = {}
    last_from: dict[Group, list[int]] = {}
    for index, step in enumerate(steps):
        last = with_last and index == len(steps) - 1
        if last:
            last_from = {group: list(total) for group, total in sizes.items()}
        for plan, tensors in step:
            plans[plan] += 1
            if last:
                last_plans[plan] += 1
            group = plan.group
            if group is None:
                continue
            owned.setdefault(group, []).append(tensors)
            total = sizes.get(group)
            if total is None:
                total = sizes[group] = [0] * len(plan.sizes)
                if last:
                    last_from[group] = [0] * len(plan.sizes)
            for slot, size in enumerate(plan.sizes):
                total[slot] += size
    return plans, last_plans, owned, last_from


def _constants(plans: Counter[Plan], width: int) -> list[int]:
    total = [0] * width
    for plan, times in plans.items():
        for slot, value in enumerate(plan.constants):
            if value:
                total[slot] += value * times
    return total


def _sums(steps: list[list[Entry]], width: int) -> tuple[list[int], list[int]]:
    """The flattened features of all ``steps`` and of the last one, on the host. A window of one step
    (a log at every step) is its own last step: summed once, and returned as both."""
    with_last = len(steps) > 1
    plans, last_plans, owned, last_from = _grouped(steps, with_last=with_last)
    window = _constants(plans, width)
    last = _constants(last_plans, width) if with_last else window
    rows = 2 if with_last else 1
    by_device: dict[torch.device, list[tuple[Group, torch.Tensor]]] = {}
    for group, tensors in owned.items():
        if _reduce_on_host(group, tensors):
            tensors = [_on_host(tensors)]
        sums = group.reduce(tensors, tuple(last_from[group]) if with_last else None)
        by_device.setdefault(sums.device, []).append((group, sums))
    for reduced in by_device.values():
        joined = (
            torch.cat([values.reshape(-1) for _, values in reduced]) if len(reduced) > 1 else reduced[0][1]
        )
        on_host = joined.reshape(-1).cpu().tolist()  # the one device-to-host copy
        offset = 0
        for group, _ in reduced:
            cells = group.cells
            for slot, total in zip(cells, on_host[offset : offset + len(cells)]):
                window[slot] += total
            if with_last:
                for slot, in_last in zip(cells, on_host[offset + len(cells) : offset + 2 * len(cells)]):
                    last[slot] += in_last
            offset += rows * len(cells)
    return window, last


def _reduce_on_host(group: Group, owned: list[tuple[torch.Tensor, ...]]) -> bool:
    """Whether a device's window is small enough to copy as it is and reduce on the host."""
    if group.device.type == "cpu":
        return False
    held = sum(tensor.numel() * tensor.element_size() for item in owned for tensor in item)
    return held <= HOST_REDUCE_BYTES


def _on_host(owned: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The batches' owned tensors, concatenated per slot and copied to the host: one copy per slot.

    A small window (a log every few steps) is reduced on the host: its dozen small reductions cost a
    few microseconds each there, against a kernel launch each on the device, which is most of a read.
    """
    return tuple((slot[0] if len(slot) == 1 else torch.cat(slot)).cpu() for slot in zip(*owned, strict=True))


def _fold(steps: list[list[Entry]], shape: tuple[int, ...]) -> list[Entry]:
    """The steps' features as one step: a feature row per device (no host sync), and the host-known
    part as a plan of constants."""
    width = _width(shape)
    plans, _, owned, _ = _grouped(steps, with_last=False)
    constants = _constants(plans, width)
    rows: dict[torch.device, torch.Tensor] = {}
    for group, tensors in owned.items():
        row = rows.get(group.device)
        if row is None:
            row = rows[group.device] = torch.zeros(width, dtype=torch.int64, device=group.device)
        row.index_add_(0, group.index(), group.reduce(tensors, None)[0])
    device = next(iter(rows)) if rows else torch.device("cpu")
    folded: list[Entry] = [(constant_plan(constants, shape, device), ())]
    for row_device, row in rows.items():
        plan = whole_plan(width, shape, row_device)
        folded.append((plan, (row.view(1, -1),)))
    return folded
