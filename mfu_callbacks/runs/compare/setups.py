"""What two runs' setups say about comparing them: runs on other GPUs or dtypes are refused (unless
allowed), and every other difference (peak, world size, FLOPs per token, torch) becomes a note."""

from __future__ import annotations

import math
from typing import Any

from .figures import FLOPS_PER_TOKEN
from .samples import CompareError, RunSamples

_FLOPS_PER_TOKEN_TOLERANCE = 0.01  # relative: beyond it the runs count different work per token


def setup_notes(baseline: RunSamples, run: RunSamples, allow_mismatch: bool) -> list[str]:
    """Refuse runs measured on other GPUs or dtypes (unless allowed); notes on what else differs."""
    return [
        *_hardware_notes(baseline, run, allow_mismatch),
        *_peak_and_world_notes(baseline, run),
        *_work_notes(baseline, run),
    ]


def _same(first: Any, second: Any) -> bool:
    return str(first).strip().lower() == str(second).strip().lower()


def _hardware_notes(baseline: RunSamples, run: RunSamples, allow_mismatch: bool) -> list[str]:
    """GPU and dtype: a mismatch is an error unless allowed, a side that records none is noted."""
    notes = []
    unchecked = []
    for key, what in (("device", "GPUs"), ("dtype", "dtypes")):
        mine, theirs = baseline.setup.get(key), run.setup.get(key)
        if mine is None or theirs is None:
            unchecked.append(key)
        elif not _same(mine, theirs):
            message = f"{run.label} was measured on other {what} than {baseline.label}: {theirs} vs {mine}"
            if not allow_mismatch:
                raise CompareError(message + " (--allow-mismatch compares them anyway)")
            notes.append(
                message + ": MFU compares how well each uses its GPU; tokens/s compares the hardware too"
            )
    if unchecked:
        silent = [side for side in (baseline, run) if any(side.setup.get(key) is None for key in unchecked)]
        notes.append(
            f"{run.label}: {' and '.join(unchecked)} not checked against {baseline.label} "
            f"({', '.join(f'{side.label} ({side.log.kind})' for side in silent)} records none)"
        )
    return notes


def _peak_and_world_notes(baseline: RunSamples, run: RunSamples) -> list[str]:
    notes = []
    peaks = baseline.setup.get("peak_tflops"), run.setup.get("peak_tflops")
    if (
        peaks[0] is not None
        and peaks[1] is not None
        and not math.isclose(float(peaks[0]), float(peaks[1]), rel_tol=1e-6)
    ):
        notes.append(
            f"{run.label}: peak {peaks[1]} TFLOP/s vs {peaks[0]}: MFU divides by different peaks; "
            "TFLOP/s per GPU compares the work done"
        )
    worlds = baseline.setup.get("world_size"), run.setup.get("world_size")
    if None not in worlds and worlds[0] != worlds[1]:
        notes.append(f"{run.label}: {worlds[1]} GPUs vs {worlds[0]}: per-GPU figures compare, totals do not")
    return notes


def _work_notes(baseline: RunSamples, run: RunSamples) -> list[str]:
    """FLOPs per token (another model, sequence length or LoRA) and torch's version."""
    notes = []
    work = baseline.mean(FLOPS_PER_TOKEN), run.mean(FLOPS_PER_TOKEN)
    if (
        work[0] is not None
        and work[1] is not None
        and work[0]
        and abs(work[1] / work[0] - 1.0) > _FLOPS_PER_TOKEN_TOLERANCE
    ):
        notes.append(
            f"{run.label}: FLOPs per token differ ({work[1]:.4g} vs {work[0]:.4g}, "
            f"{100 * (work[1] / work[0] - 1):+.1f}%: another model, sequence length or LoRA): tokens/s per "
            "GPU answers 'is it faster', MFU answers 'does it use the GPU better'"
        )
    torch_versions = baseline.log.versions.get("torch"), run.log.versions.get("torch")
    if None not in torch_versions and torch_versions[0] != torch_versions[1]:
        notes.append(f"{run.label}: torch {torch_versions[1]} vs {torch_versions[0]}")
    return notes
