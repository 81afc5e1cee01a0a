"""Whether MFU is being measured, and if not, why and what to do: what ``mfu_status`` says, the
warning, the report and the summaries. The one home of the status: its codes, their reasons and fixes,
and how a read is judged.

``mfu_status`` is added by the integrations at every read, so it is logged on the rows without MFU too,
from the first read on (warm-up included), and after a failure for as long as training goes on:

====  ===============  ==================================================================================
code  name             meaning
====  ===============  ==================================================================================
 1    ``MEASURING``    ``mfu`` is in the row
 2    ``WARMING_UP``   no measured step yet: warm-up steps and the step that built the FLOP engine
 0    ``OFF``          MFU is not measured on this rank: the FLOP engine could not be built (no batch
                       could be counted) or the callback stopped after an error
-1    ``NO_PEAK``      the GPU's peak FLOP/s is unknown: throughput is logged, MFU cannot be
-2    ``NOT_COUNTED``  some rank could not count its FLOPs in this window: MFU of the others alone
                       would pass for the whole job's, so it is left out
====  ===============  ==================================================================================

The reason and the fix are said once per run in the framework's log (a warning), at the end of the
run in the report, in the W&B run summary (``mfu_run/status``, ``mfu_run/status_reason``) and in
the run summary file (``status``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._guard import Guard
    from .meter import MFUMeter


class MFUStatus(IntEnum):
    """The codes of ``mfu_status`` (a number, as W&B, TensorBoard and CSV loggers want): table above."""

    WARMING_UP = 2
    MEASURING = 1
    OFF = 0
    NO_PEAK = -1
    NOT_COUNTED = -2


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
    from .metrics import MFU  # metrics imports this module (MFUStatus) at its top

    if MFU in values:
        return MEASURING
    if values:
        return no_peak(peak_device) if peak_device is not None else NOT_COUNTED
    if not engine_built and past_warmup:
        return NO_BATCH_COUNTED
    return previous if previous.code != MFUStatus.OFF else WARMING_UP


class RunStatus:
    """One run's status as its reads find it; a status without MFU is said once per run (``warn``)."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.current: Status = WARMING_UP  # what the last read (or the end of the run) found
        self._warn = warn
        self._warned: set[MFUStatus] = set()

    def judge(
        self, values: Mapping[str, float], guard: Guard, meter: MFUMeter | None, *, past_warmup: bool
    ) -> Status:
        """The status of a read that gave ``values``, of a session whose meter is ``meter``."""
        if guard.failed:
            return stopped(guard.reason or "", guard.fix or "")
        if meter is None:
            return stopped("no model was given to measure", "pass the model when training starts")
        return judge(
            values,
            self.current,
            engine_built=meter.engine is not None,
            past_warmup=past_warmup,
            peak_device=str(meter.device) if meter.peak is None else None,
        )

    def set(self, status: Status) -> None:
        """The run's status is now ``status``: warned about, the first time, unless MFU is on its way."""
        self.current = status
        if status.code not in (MFUStatus.MEASURING, MFUStatus.WARMING_UP) and status.code not in self._warned:
            self._warned.add(status.code)
            self._warn(status.message())

    def finish(self, judged: Status) -> None:
        """The run's status as it ends: a window left without MFU by a rank's failure still counts."""
        if judged.measuring and self.current.code == MFUStatus.NOT_COUNTED:
            judged = self.current
        self.set(judged)
