"""The metrics ``compare`` shows, one row each: its label, its unit, which way is better, and whether
it is compared relatively (percent) or in percentage points."""

from __future__ import annotations

from dataclasses import dataclass

from ... import metrics as m
from .figures import FLOPS_PER_TOKEN


@dataclass(frozen=True)
class Row:
    """One compared metric: its table label, how to print it, which way is better, how to compare it."""

    key: str
    label: str
    unit: str  # "percent", "tflops", "rate", "seconds", "flops"
    better: int  # +1 higher is better, -1 lower is better, 0 neither
    points: bool = False  # compared in percentage points, not relative


# The table's rows, in its order.
ROWS = (
    Row(m.MFU, "MFU", "percent", +1),
    Row(m.HFU, "HFU", "percent", +1),
    Row(m.TFLOPS_PER_GPU, "TFLOP/s per GPU", "tflops", +1),
    Row(m.TOKENS_PER_SEC_PER_GPU, "tokens/s per GPU", "rate", +1),
    Row(m.STEP_TIME, "step time", "seconds", -1),
    Row(FLOPS_PER_TOKEN, "FLOPs per token", "flops", 0),
    Row(m.PADDING_FRACTION, "padding", "percent", -1, points=True),
    Row(m.INPUT_WAIT_FRACTION, "input wait", "percent", -1, points=True),
)
# Every compared metric by key: the table's rows and tokens/s, which is compared but not shown.
ROW_OF = {row.key: row for row in ROWS}
ROW_OF[m.TOKENS_PER_SEC] = Row(m.TOKENS_PER_SEC, "tokens/s", "rate", +1)
GATE_METRICS = (m.MFU, m.HFU, m.TFLOPS_PER_GPU, m.TOKENS_PER_SEC_PER_GPU, m.TOKENS_PER_SEC, m.STEP_TIME)
SPEED_METRIC = m.TOKENS_PER_SEC_PER_GPU
