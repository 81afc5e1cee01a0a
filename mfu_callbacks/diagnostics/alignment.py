"""What a misaligned matmul size costs this run: measured in the run, read from the measured table, or unknown.

The shape checks claim a cost only from a measurement. In order of precedence:

1. the run's own matmul times (``Review.measured_matmuls``, from profiled steps): the component's
   slowdown against the step's fastest matmuls, and its measured seconds;
2. the table of measured slowdowns (``slowdowns.py``) for this GPU family, dtype and shape class:
   the layer's time is its FLOPs at the rate the misaligned layer ran at when measured;
3. nothing: the size is reported as off the tensor cores' alignment with no cost
   (``mfu_cost=None``), and only where it is off the dtype's 16-byte alignment, the documented
   requirement; a multiple of 8 that is not one of 64 says nothing without a measurement.

Time saved by fixing the size: the misaligned matmuls' time x (1 - 1 / slowdown).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import slowdowns
from .measured import MatmulTime, measured_slowdown
from .slowdowns import MULTIPLE_OF_8_NOT_64, OUT_FEATURES, Slowdown

# A measured slowdown under this is within timing noise (table) or within the spread of rates that
# aligned matmuls of different shapes show (in-run, where the reference is the fastest component).
TABLE_MIN_SLOWDOWN = 1.02
RUN_MIN_SLOWDOWN = 1.25
MEASURED_IN_RUN = "measured in this run"


@dataclass(frozen=True)
class Cost:
    """A measured slowdown and the share of the step's time that fixing the size would save.

    time_share: None where the table holds a ratio without a rate, or the estimate does not fit in
    the step (a table measured at other sizes than this model's).
    """

    slowdown: float
    time_share: float | None
    source: str

    @property
    def in_run(self) -> bool:
        return self.source == MEASURED_IN_RUN


def from_run(measured: Mapping[str, MatmulTime] | None, component: str, step_seconds: float) -> Cost | None:
    """The component's cost from the run's own matmul times; None where it was not measured.

    A measured slowdown below ``RUN_MIN_SLOWDOWN`` is a cost of 0: measured, nothing to gain.
    """
    if not measured or step_seconds <= 0:
        return None
    slowdown = measured_slowdown(measured, component)
    if slowdown is None:
        return None
    if slowdown < RUN_MIN_SLOWDOWN:
        return Cost(slowdown, 0.0, MEASURED_IN_RUN)
    saved = measured[component].seconds * (1.0 - 1.0 / slowdown)
    return Cost(slowdown, _fits(saved / step_seconds), MEASURED_IN_RUN)


def from_table(
    device_name: str | None,
    dtype: str | None,
    size: int,
    role: str,
    other_size: int,
    flops: float,
    run_seconds: float,
    table: Iterable[Slowdown] | None = None,
) -> Cost | None:
    """The cost of ``flops`` (over the run) of a layer with a misaligned ``size`` from the table; None
    where nothing was measured for this GPU family, dtype, shape class and role.

    A row under ``TABLE_MIN_SLOWDOWN`` is a cost of 0: measured, nothing to gain.
    """
    row = slowdowns.find(device_name, dtype, size, role, other_size=other_size, table=table)
    if row is None:
        return None
    if row.slowdown < TABLE_MIN_SLOWDOWN:
        return Cost(row.slowdown, 0.0, row.label)
    if row.tflops is None or run_seconds <= 0:
        return Cost(row.slowdown, None, row.label)
    saved = flops / (row.tflops * 1e12) * (1.0 - 1.0 / row.slowdown)
    return Cost(row.slowdown, _fits(saved / run_seconds), row.label)


def padding_multiple(
    device_name: str | None, dtype: str | None, table: Iterable[Slowdown] | None = None
) -> int:
    """The multiple to pad a size to: 8 where a measurement shows multiples of 8 cost nothing here, else 64."""
    row = slowdowns.find(device_name, dtype, 8, OUT_FEATURES, table=table)
    ok = row is not None and row.shape_class == MULTIPLE_OF_8_NOT_64 and row.slowdown < TABLE_MIN_SLOWDOWN
    return 8 if ok else 64


def _fits(share: float) -> float | None:
    """A share of the step's time, None where it would be the whole step or more (the estimate does not fit)."""
    return share if 0.0 <= share < 1.0 else None
