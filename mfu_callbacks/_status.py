"""Whether MFU is being measured, and if not, why and what to do: what ``mfu_status`` says (codes in
:mod:`mfu_callbacks.metrics`), the warning, the report and the summaries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .metrics import MFU, MFUStatus


@dataclass(frozen=True)
class Status:
    """A status code with its reason and fix, one line each ("" when there is nothing to say)."""

    code: MFUStatus
    reason: str = ""
    fix: str = ""

    @property
    def measuring(self) -> bool:
        return self.code == MFUStatus.MEASURING

    @property
    def name(self) -> str:
        return self.code.name.lower()

    def as_dict(self) -> dict[str, Any]:
        """For the run summary file: the code, its name, the reason and the fix."""
        return {"code": int(self.code), "name": self.name, "reason": self.reason, "fix": self.fix}

    def message(self) -> str:
        """The warning said once per run in the framework's log."""
        return f"mfu_callbacks: MFU is not measured ({self.name}): {self.reason.rstrip('.')}. Fix: {self.fix}"


MEASURING = Status(MFUStatus.MEASURING)
WARMING_UP = Status(
    MFUStatus.WARMING_UP,
    "no measured step yet (warm-up steps and the step that built the FLOP engine are left out)",
    "train for more than warmup_steps + 1 optimizer steps, or lower warmup_steps",
)
NOT_COUNTED = Status(
    MFUStatus.NOT_COUNTED,
    "a rank could not count the FLOPs of its steps, so MFU is left out (the other ranks' alone would "
    "pass for the whole job's)",
    "read the warning or traceback that rank logged through the 'mfu_callbacks' logger",
)
NO_BATCH_COUNTED = Status(
    MFUStatus.OFF,
    "no batch could be counted, so the FLOP engine was never built: every step was left out "
    "(the first batch's problem is in the log)",
    "pass token_counter=fn(batch) returning a dict with 'input_ids' (and 'attention_mask')",
)


def stopped(reason: str, fix: str) -> Status:
    """MFU stopped on this rank after an error (the guard's reason and fix)."""
    return Status(MFUStatus.OFF, reason, fix)


def no_peak(device: str) -> Status:
    return Status(
        MFUStatus.NO_PEAK,
        f"the dense peak FLOP/s of {device} is unknown, so throughput is measured but MFU cannot be",
        "pass peak_tflops= (dense TFLOP/s per GPU at the compute dtype) or set MFU_PEAK_TFLOPS",
    )


def judge(
    values: Mapping[str, float],
    previous: Status,
    *,
    engine_built: bool,
    past_warmup: bool,
    peak_device: str | None,
) -> Status:
    """The status of a read that gave ``values`` (the meter's metrics or summary) on a working meter.

    ``peak_device``: the device name when its peak is unknown, None when it is known. A read without
    values keeps the previous status, since nothing changed (warm-up until something was measured).
    """
    if MFU in values:
        return MEASURING
    if values:
        return no_peak(peak_device) if peak_device is not None else NOT_COUNTED
    if not engine_built and past_warmup:
        return NO_BATCH_COUNTED
    return previous if previous.code != MFUStatus.OFF else WARMING_UP
