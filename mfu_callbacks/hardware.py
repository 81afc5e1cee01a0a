"""Dense peak FLOP/s per GPU, per dtype: the denominator of MFU.

The table is data (:mod:`mfu_callbacks.hardware_table`): one :class:`GpuSpec` row per chip, with
the dense (not 2:4-sparse) datasheet figures in TFLOP/s and the datasheet they come from. This
module finds a device's row (name, multiprocessors, MIG slice) and gives its peak.

A device the table does not know gets no peak: MFU is then left out (after one warning naming
the ways to give the peak), never measured against a guessed one.

    peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)   # 989.4e12
    resolve_peak(torch.device("cuda", 0), "bf16")          # PeakInfo(flops=..., source=...)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields, replace

import torch

from . import _validate
from ._validate import PEAK_ENV_VAR
from .hardware_table import MEMORY_BANDWIDTH, PEAK_TABLE, GpuSpec
from .precision import COMPUTE_DTYPES, parse_compute_dtype

__all__ = [
    "MEMORY_BANDWIDTH",
    "PEAK_ENV_VAR",
    "PEAK_TABLE",
    "GpuSpec",
    "PeakInfo",
    "known_gpus",
    "lookup_gpu",
    "memory_bandwidth",
    "peak_flops",
    "resolve_peak",
    "short_gpu_names",
]

logger = logging.getLogger("mfu_callbacks")

_DEFAULT_MIG_SLICES = 7  # compute slices of a full chip (A100, H100, H200, B200); the A30 has 4
_VENDOR_WORDS = frozenset({"nvidia", "amd", "tesla", "instinct", "geforce", "radeon"})
_HOST_DEVICE_TYPES = frozenset({"cpu", "meta"})
_DEVICE_SPEC = re.compile(r"^(cpu|cuda|meta|mps|xpu|hpu|privateuseone)(:\d+)?$")
_MIG_PROFILE = re.compile(r"\bmig\b\s*(?:(\d+)c\.)?(\d+)g\.")  # "MIG 3g.20gb", "MIG 1c.3g.40gb"


@dataclass(frozen=True)
class PeakInfo:
    """The peak MFU divides by: FLOP/s of one GPU at the dtype key, and where the figure came from.

    ``table``: the same GPU's dense FLOP/s at every dtype the peak table has a figure for, as
    (dtype, FLOP/s) pairs, when the peak came from the table (empty for a peak given by hand): the
    peaks of a step whose matmuls run in several dtypes (``at``).
    """

    flops: float
    device_name: str
    dtype: str
    source: str
    table: tuple[tuple[str, float], ...] = ()

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def at(self, dtype: str) -> PeakInfo | None:
        """The same GPU's peak at another dtype key; None where the table has no figure (or the peak
        was given by hand: it holds for one dtype only)."""
        if dtype == self.dtype:
            return self
        flops = dict(self.table).get(dtype)
        return replace(self, flops=flops, dtype=dtype) if flops is not None else None


_PEAK_FIELDS = tuple(field.name for field in fields(GpuSpec) if field.name in COMPUTE_DTYPES)
_warned_keys: set[str] = set()


def known_gpus() -> list[str]:
    """Canonical names of every chip in the table."""
    return [row.name for row in PEAK_TABLE]


def short_gpu_names() -> list[str]:
    """The name people type for each chip ("h100", "a100-pcie", "l40s", "mi300x"): its first alias, else its
    canonical name without the vendor's words, where that finds the same row (else the canonical name)."""
    names = []
    for row in PEAK_TABLE:
        words = [word for word in row.name.lower().split() if word not in _VENDOR_WORDS]
        short = row.aliases[0] if row.aliases else "-".join(words)
        names.append(short if lookup_gpu(short) is row else row.name)
    return names


def lookup_gpu(name: str) -> GpuSpec | None:
    """The table row for a short name ("h100", "a100-40gb", "mi300x", "4090"), a canonical name, or a device name.

    A bare family name means its most common form ("h100" is the H100 SXM). A device name that
    fits several rows with different figures gives None.
    """
    wanted = _compact(name)
    for row in PEAK_TABLE:
        if wanted == _compact(row.name) or wanted in {_compact(alias) for alias in row.aliases}:
            return row
    rows, _ = _matching_rows(name, None)
    if rows and all(_figures(row) == _figures(rows[0]) for row in rows):
        return rows[0]
    return None


def peak_flops(
    device_or_name: torch.device | int | str, dtype: torch.dtype | str, *, multiprocessors: int | None = None
) -> float | None:
    """Dense peak FLOP/s of one GPU at ``dtype``; None for an unknown device or a dtype the chip lacks.

    ``device_or_name``: a ``torch.device``, a CUDA device index, or a device name as
    ``torch.cuda.get_device_name()`` reports it ("NVIDIA H100 80GB HBM3", MIG slices included).
    ``multiprocessors`` (SM count) tells apart chips that share a name; for a device it is read
    from the device. ``dtype``: a torch dtype or a key ("bf16", "fp16", "tf32", "fp32", "fp8").
    """
    key = parse_compute_dtype(dtype)
    identity = _identify(device_or_name, multiprocessors)
    if identity is None:
        return None
    tflops, _, _ = _table_peak(*identity, key)
    return tflops * 1e12 if tflops is not None else None


def resolve_peak(
    device: torch.device | int | str | None, dtype: torch.dtype | str, *, override_tflops: float | None = None
) -> PeakInfo | None:
    """The peak an integration divides by: ``override_tflops``, else ``$MFU_PEAK_TFLOPS``, else the table.

    An unknown device gives None after one warning per process per device name (naming both ways
    to give the peak). A CPU device gives None silently unless an override is given. ``device``
    None means the current CUDA device, or the CPU without CUDA.
    """
    key = parse_compute_dtype(dtype, device=device if isinstance(device, (torch.device, int)) else None)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    identity = _identify(device, None)
    device_name = identity[0] if identity is not None else str(device)
    override = _validate.peak_tflops(override_tflops)
    if override is not None:
        return PeakInfo(override * 1e12, device_name, key, "override argument")
    env_tflops = _validate.env_peak_tflops()
    if env_tflops is not None:
        return PeakInfo(env_tflops * 1e12, device_name, key, PEAK_ENV_VAR)
    if identity is None:
        return None
    tflops, row, problem = _table_peak(*identity, key)
    if tflops is None or row is None:
        _warn_once(
            f"{device_name}|{key}" if row is not None else device_name,
            f"mfu_callbacks: device {device_name!r} {problem}; MFU and HFU are left out. Give the dense "
            f"peak TFLOP/s of one GPU with peak_tflops= (on the callback or meter) or the environment "
            f"variable {PEAK_ENV_VAR}.",
        )
        return None
    table = tuple(
        (dtype, figure * 1e12)
        for dtype in COMPUTE_DTYPES
        if (figure := _table_peak(*identity, dtype)[0]) is not None
    )
    return PeakInfo(tflops * 1e12, device_name, key, row.source, table)


def memory_bandwidth(
    device_or_name: torch.device | int | str, *, multiprocessors: int | None = None
) -> tuple[float, str] | None:
    """Datasheet memory bandwidth of one GPU in bytes/s, and its source; None for an unknown device.

    A MIG slice gets its share of the chip (memory slices follow compute slices in every profile).
    """
    identity = _identify(device_or_name, multiprocessors)
    if identity is None:
        return None
    rows, compute_slices = _matching_rows(*identity)
    figures = {MEMORY_BANDWIDTH.get(row.name) for row in rows}
    if len(figures) != 1 or None in figures:
        return None
    ((tbps, source),) = figures  # type: ignore[misc]
    return tbps * 1e12 * _chip_share(rows[0], compute_slices, identity[1]), source


# -- identifying the device ---------------------------------------------------------------------------
def _identify(
    device_or_name: torch.device | int | str, multiprocessors: int | None
) -> tuple[str, int | None] | None:
    """The device's name and multiprocessor count; None for a host device (CPU, meta)."""
    device = _as_device(device_or_name)
    if device is None:
        return str(device_or_name), multiprocessors
    if device.type in _HOST_DEVICE_TYPES:
        return None
    if device.type != "cuda":  # CUDA covers ROCm too; other accelerators have no rows
        return str(device), None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return torch.cuda.get_device_name(index), properties.multi_processor_count
    except (AssertionError, RuntimeError):  # torch without CUDA, or no such device
        return str(device), None


def _as_device(device_or_name: torch.device | int | str) -> torch.device | None:
    """A torch.device for a device, an index or a device string ("cuda:1"); None for a GPU name."""
    if isinstance(device_or_name, torch.device):
        return device_or_name
    if isinstance(device_or_name, int) and not isinstance(device_or_name, bool):
        return torch.device("cuda", device_or_name)
    if isinstance(device_or_name, str) and _DEVICE_SPEC.match(device_or_name.strip().lower()):
        return torch.device(device_or_name.strip().lower())
    return None


def _words(name: str) -> list[str]:
    """Lower-case words of a device name, vendor words dropped ("NVIDIA", "Tesla", "AMD Instinct", ...)."""
    words = re.sub(r"[\s_\-,]+|\(tm\)|\(r\)|®|™", " ", name.lower()).split()
    return [word for word in words if word not in _VENDOR_WORDS]


def _compact(name: str) -> str:
    """A name with vendor words and punctuation gone, for short-name matching ("H100-PCIe" -> "h100pcie")."""
    return re.sub(r"[^a-z0-9]", "", "".join(_words(name)))


def _matching_rows(name: str, multiprocessors: int | None) -> tuple[list[GpuSpec], int | None]:
    """Rows whose patterns fit ``name``, and the compute slices of a MIG instance (None for a whole chip).

    On a whole chip a known multiprocessor count must equal the row's: it picks between chips that
    share a name and turns away cut-down variants. On a MIG slice the count is the slice's own.
    """
    lowered = name.lower()
    mig = _MIG_PROFILE.search(lowered)
    compute_slices = None
    if mig is not None:
        compute_slices = int(mig.group(1) or mig.group(2))
        lowered = lowered[: mig.start()]
    normalized = " ".join(_words(lowered))
    rows = [row for row in PEAK_TABLE if any(re.search(pattern, normalized) for pattern in row.patterns)]
    if compute_slices is not None:
        rows = [row for row in rows if row.mig_slices is not None]
    elif multiprocessors is not None:
        rows = [row for row in rows if row.multiprocessors in (None, multiprocessors)]
    return rows, compute_slices


def _chip_share(row: GpuSpec, compute_slices: int | None, multiprocessors: int | None) -> float:
    """The fraction of the chip a device has: 1 for a whole chip, the SM (or slice) share for a MIG instance."""
    if compute_slices is None:
        return 1.0
    if multiprocessors is not None and row.multiprocessors and 0 < multiprocessors <= row.multiprocessors:
        return multiprocessors / row.multiprocessors
    return compute_slices / (row.mig_slices or _DEFAULT_MIG_SLICES)


def _table_peak(name: str, multiprocessors: int | None, key: str) -> tuple[float | None, GpuSpec | None, str]:
    """Dense TFLOP/s from the table, the row it came from, and what went wrong when there is none."""
    rows, compute_slices = _matching_rows(name, multiprocessors)
    if not rows:
        with_count = f" with {multiprocessors} multiprocessors" if multiprocessors is not None else ""
        return None, None, f"is not in the dense peak table{with_count}"
    values = {row.dense_tflops(key) for row in rows}
    if len(values) > 1:
        names = ", ".join(row.name for row in rows)
        return None, None, f"fits several rows of the peak table ({names}) that differ at {key}"
    (per_chip,) = values
    if per_chip is None:
        return None, rows[0], f"({rows[0].name}) has no dense {key} figure in the peak table"
    return per_chip * _chip_share(rows[0], compute_slices, multiprocessors), rows[0], ""


def _figures(row: GpuSpec) -> tuple[float | None, ...]:
    return tuple(getattr(row, name) for name in _PEAK_FIELDS)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_keys:
        _warned_keys.add(key)
        logger.warning(message)
