"""The SM clock of one GPU through NVML (``nvidia-ml-py``, imported on first use), read at log time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

# Bits of nvmlDeviceGetCurrentClocksEventReasons (formerly ...ThrottleReasons), stable across versions.
_GPU_IDLE = 0x1
_CLOCK_REASONS: Mapping[int, str] = {
    0x2: "application clock setting",
    0x4: "power cap",
    0x8: "hardware slowdown",
    0x20: "thermal slowdown (software)",
    0x40: "thermal slowdown (hardware)",
    0x80: "power brake",
}


def visible_devices(variable: str | None) -> list[int] | list[str] | None:
    """The host GPUs CUDA shows, in CUDA's order, as torch reads ``CUDA_VISIBLE_DEVICES``
    (torch.cuda parses it the same way): None when unset (every GPU, in NVML's order); NVML indices;
    or ``GPU-`` / ``MIG-`` UUIDs (or their prefixes). A list stops at its first entry of another kind
    or a negative number; a repeated entry hides every GPU; ``"1gpu2"`` reads as 1, as ``strtoul`` does."""
    if variable is None:
        return None
    for prefix in ("GPU-", "MIG-"):
        if variable.startswith(prefix):
            uuids: list[str] = []
            for entry in variable.split(","):
                if entry in uuids:
                    return []
                if not entry.startswith(prefix):
                    break
                uuids.append(entry)
            return uuids
    indices: list[int] = []
    for entry in variable.split(","):
        number = _leading_number(entry.strip())
        if number in indices:
            return []
        if number < 0:
            break
        indices.append(number)
    return indices


def _leading_number(text: str) -> int:
    """The number ``text`` starts with (a sign allowed), -1 when it starts with none."""
    end = 0
    while end < len(text) and (text[end].isdigit() or (end == 0 and text[end] in "+-")):
        end += 1
    try:
        return int(text[:end])
    except ValueError:
        return -1


def nvml_handle(nvml: Any, device: torch.device) -> Any:
    """The NVML handle of the GPU torch calls ``device``: CUDA numbers the visible GPUs, NVML all
    of the host's. A UUID entry is looked up by UUID (a prefix by matching every GPU's UUID, as
    torch does); a MIG instance answers for its parent GPU, whose SM clock it runs at. None when
    the device is not among the visible ones or a prefix matches none or several."""
    index = (
        device.index
        if device.index is not None
        else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    )
    visible = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is None:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    if index >= len(visible):
        return None
    entry = visible[index]
    if isinstance(entry, int):
        return nvml.nvmlDeviceGetHandleByIndex(entry)
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(entry)
    except Exception:  # noqa: BLE001 - not a whole UUID: a prefix of one
        handle = _handle_by_uuid_prefix(nvml, entry)
    if handle is not None and entry.startswith("MIG-"):
        handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    return handle


def _handle_by_uuid_prefix(nvml: Any, prefix: str) -> Any:
    matches = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        if (uuid.decode() if isinstance(uuid, bytes) else str(uuid)).startswith(prefix):
            matches.append(handle)
    return matches[0] if len(matches) == 1 else None


class NvmlClocks:
    """The SM clock of one GPU through NVML (``nvidia-ml-py``, imported on first use); None when unavailable."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._maximum: float | None = (
            None  # the SM clock's maximum does not change: asked once (ms on some hosts)
        )
        self._unavailable = False

    def read(self, device: torch.device) -> tuple[float, float, list[str]] | None:
        """(current MHz, maximum MHz, reasons the clock is held down); None when NVML is missing or the GPU idles."""
        if self._unavailable:
            return None
        try:
            import pynvml

            if self._handle is None:
                pynvml.nvmlInit()
                self._handle = nvml_handle(pynvml, device)
                if self._handle is None:
                    raise LookupError(f"NVML does not see the GPU CUDA calls {device}")
            current = pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
            if self._maximum is None:
                self._maximum = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
            maximum = self._maximum
            get_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
            )
            mask = int(get_reasons(self._handle)) if get_reasons is not None else 0
        except Exception:  # noqa: BLE001 - no pynvml, no driver, or a GPU NVML cannot see: skip the check
            self._unavailable = True
            return None
        if mask & _GPU_IDLE or not maximum:
            return None  # an idle GPU clocks down: not a reading taken while training
        return float(current), float(maximum), [name for bit, name in _CLOCK_REASONS.items() if mask & bit]


SM_CLOCK_THRESHOLD = 0.80  # SM clock over its maximum, below which a read counts as throttled


SAMPLE_SECONDS = 5.0  # at most one reading per 5 s: an NVML query costs 0.1-0.3 ms of host time


class ClockLog:
    """SM clock readings taken at log time, before waiting for the GPU (while the steps still run);
    at most one per ``SAMPLE_SECONDS``, so a run that logs every step pays for few of them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = NvmlClocks()
        self._clock = clock
        self._sampled_at: float | None = None
        self.reads = 0
        self.low_ratios: list[float] = []
        self.low_reasons: set[str] = set()
        self.max_mhz = 0.0

    def sample(self, device: torch.device) -> None:
        if device.type != "cuda":
            return
        now = self._clock()
        if self._sampled_at is not None and now - self._sampled_at < SAMPLE_SECONDS:
            return
        self._sampled_at = now
        reading = self._nvml.read(device)
        if reading is None:
            return
        current, maximum, reasons = reading
        self.reads += 1
        self.max_mhz = maximum
        ratio = current / maximum
        if ratio < SM_CLOCK_THRESHOLD:
            self.low_ratios.append(ratio)
            self.low_reasons.update(reasons)
