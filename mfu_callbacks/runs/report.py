"""The end-of-run report: one block of text with the run's MFU, its FLOPs by component and the diagnoses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..flops import StepFlops
from ..hardware import PeakInfo
from ..metrics import MFUStatus

if TYPE_CHECKING:
    from .._status import Status

_SHOWN_SHARE = 0.0005  # a component under this share of the model FLOPs would print as 0.0%


def format_report(
    summary: Mapping[str, float],
    run_flops: StepFlops | None,
    peak: PeakInfo | None,
    diagnoses: Sequence[Any] = (),
    status: Status | None = None,
    dtypes: Mapping[str, tuple[float, PeakInfo | None]] | None = None,
    device: str | None = None,
) -> str:
    """The report as printed when training ends; ``summary`` is ``MFUMeter.summary()``, ``status``
    whether MFU was measured (a run without it says why and what to do), ``dtypes``
    ``MFUMeter.matmul_dtypes()``: with matmuls in several dtypes, each one's share and its peak;
    ``device`` where it ran (names a CPU as such when there is no peak). Every share and utilization
    is in percent."""
    lines = ["MFU report (mfu-callbacks), measured steps after warm-up"]
    # Without a peak, the peak line below says what is missing and how to supply it.
    if status is not None and not status.measuring and status.code != MFUStatus.NO_PEAK:
        where = " in every window" if status.code == MFUStatus.NOT_COUNTED else ""
        lines.append(f"  MFU not measured{where} ({status.name}): {status.reason}")
        lines.append(f"  fix: {status.fix}")
    lines += _peak_lines(peak, status, dtypes, device)
    figures = [
        ("MFU", summary.get("mfu"), "{:.1%}"),
        ("HFU", summary.get("hfu"), "{:.1%}"),
        ("model TFLOP/s per GPU", summary.get("tflops_per_gpu"), "{:.1f}"),
        ("tokens/s per GPU", summary.get("tokens_per_sec_per_gpu"), "{:,.0f}"),
    ]
    shown = [f"{name} {form.format(value)}" for name, value, form in figures if value is not None]
    if shown:
        lines.append("  " + "   ".join(shown))
    if run_flops is not None and run_flops.model_flops > 0:
        lines.append("  model FLOPs by component:")
        total = run_flops.model_flops
        for component, flops in sorted(run_flops.breakdown.items(), key=lambda item: -item[1]):
            if abs(flops) >= _SHOWN_SHARE * total:  # leaves out rounding residue of the fit ("-0.0%")
                lines.append(f"    {component:<24} {flops / total:>6.1%}")
        if run_flops.padded_tokens:
            lines.append(f"  padding: {run_flops.padding_fraction:.1%} of computed tokens")
    if diagnoses:
        lines.append("  diagnoses:")
        lines.extend(f"    [{getattr(d, 'id', '?')}] {getattr(d, 'message', d)}" for d in diagnoses)
    return "\n".join(lines)


def _peak_lines(
    peak: PeakInfo | None,
    status: Status | None,
    dtypes: Mapping[str, tuple[float, PeakInfo | None]] | None,
    device: str | None,
) -> list[str]:
    """The peak MFU is judged against (each matmul dtype's, when they differ), or why there is none."""
    lines = []
    per_dtype = bool(dtypes) and len({p.dtype for _, p in (dtypes or {}).values() if p is not None}) > 1
    if peak is not None and per_dtype:
        lines.append(f"  peak: {peak.device_name}, dense per GPU at each matmul's dtype ({peak.source})")
    elif peak is not None:
        lines.append(
            f"  peak: {peak.device_name}, {peak.dtype}, {peak.tflops:.1f} TFLOP/s dense per GPU ({peak.source})"
        )
    elif status is None or status.code == MFUStatus.NO_PEAK:
        where = "cpu (a CPU has no datasheet peak)" if _is_cpu(device) else "unknown GPU"
        if device and not _is_cpu(device):
            where += f" ({device})"
        lines.append(f"  peak: {where}, MFU not computed (pass peak_tflops= or set MFU_PEAK_TFLOPS)")
    if dtypes and len(dtypes) > 1:
        lines.append("  model FLOPs by matmul dtype, each judged against the peak named:")
        for dtype, (share, dtype_peak) in dtypes.items():
            judged = (
                f"{dtype_peak.dtype} peak {dtype_peak.tflops:.1f} TFLOP/s"
                if dtype_peak is not None
                else "no peak"
            )
            lines.append(f"    {dtype:<24} {share:>6.1%}   {judged}")
    return lines


def _is_cpu(device: str | None) -> bool:
    return device is not None and device.split(":")[0].strip().lower() == "cpu"
