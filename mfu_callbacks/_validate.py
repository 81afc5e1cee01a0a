"""Checks of user-given values, written once and used by every class that takes them.

Each check returns the value in its normal form or raises ValueError with a message that names the
option, what was given and what is accepted, so a bad setting fails where it is written, not in
the middle of a run.
"""

from __future__ import annotations

import math
import os
from typing import Any

PEAK_ENV_VAR = "MFU_PEAK_TFLOPS"
# A peak outside this range is a typo or a unit mistake (FLOP/s for TFLOP/s): the fastest GPU's
# dense fp8 peak is a few thousand TFLOP/s, and below a microTFLOP/s MFU overflows to infinity.
_PEAK_TFLOPS_RANGE = (1e-6, 1e6)


def peak_tflops(value: Any, *, name: str = "peak_tflops") -> float | None:
    """A dense peak in TFLOP/s per GPU (None stays None): a finite number in a plausible range."""
    if value is None:
        return None
    low, high = _PEAK_TFLOPS_RANGE
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # Compared as given: exact for an int of any size (10**400 would overflow a float), False for NaN.
    if not (is_number and low <= value <= high):
        raise ValueError(
            f"{name} must be a positive number of dense TFLOP/s per GPU, from {low:g} to {high:g} "
            f"(such as 989.4 for an H100 SXM in bf16), got {value!r}"
        )
    return float(value)


def env_peak_tflops() -> float | None:
    """``$MFU_PEAK_TFLOPS`` as a number; None when unset or empty; anything else raises."""
    raw = os.environ.get(PEAK_ENV_VAR, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    try:
        return peak_tflops(value, name=PEAK_ENV_VAR)
    except ValueError:
        low, high = _PEAK_TFLOPS_RANGE
        raise ValueError(
            f"{PEAK_ENV_VAR}={raw!r} is not a peak: expected a positive number of dense TFLOP/s per GPU, "
            f"from {low:g} to {high:g}, such as {PEAK_ENV_VAR}=989.4"
        ) from None


def whole_number(value: Any, *, name: str, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool) of at least ``minimum`` (and at most ``maximum``, if given)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        accepted = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{name} must be a whole number {accepted}, got {value!r}")
    return value


# Each profiled step keeps its profiler trace in memory until the window closes (about 1.35 MB a step
# on a small model, issue 25) and is left out of MFU: a few steps show where the time goes.
MAX_PROFILE_STEPS = 100


def profile_steps(value: Any) -> int:
    """How many steps to profile: 0 (never) to ``MAX_PROFILE_STEPS``."""
    return whole_number(value, name="profile_steps", minimum=0, maximum=MAX_PROFILE_STEPS)


def optional_whole_number(value: Any, *, name: str, minimum: int) -> int | None:
    """None, or an int (not a bool) of at least ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum} or None, got {value!r}")
    return value


def compute_dtype(value: Any) -> Any:
    """The dtype the matmuls run in, checked and returned as given (None: detected later).

    Accepts what ``precision.parse_compute_dtype`` accepts: a torch dtype, a peak-table key ("bf16",
    "fp16", "tf32", "fp32", "fp8"), a torch dtype name or a Lightning precision string. The value is
    kept as given because "32-true" resolves to tf32 or fp32 only on the device it runs on.
    """
    if value is not None:
        from .precision import parse_compute_dtype

        parse_compute_dtype(value)
    return value


REAL_STEP_MODES = ("check", "only", "off")


def real_step(value: object) -> str:
    """How the real training step is used to count FLOPs (see ``MFUMeter``)."""
    if value not in REAL_STEP_MODES:
        raise ValueError(
            f"real_step must be one of {', '.join(repr(m) for m in REAL_STEP_MODES)}, got {value!r}"
        )
    return str(value)
