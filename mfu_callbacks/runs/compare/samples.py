"""One run as ``compare`` reads it: its log and each metric's figure over its windows after warm-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ... import metrics as m
from ..logs import RunLog, RunLogError, read_run
from .figures import FLOPS_PER_TOKEN, run_figures
from .intervals import Estimate


class CompareError(Exception):
    """Runs that cannot be compared: printed as one line, exit code 2."""


@dataclass
class RunSamples:
    """One run as compared: its label, where it was read from, its setup and each metric's figure
    (``figures.py``) over its windows after warm-up."""

    label: str
    log: RunLog
    estimates: dict[str, Estimate]
    windows_used: int
    from_totals: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def setup(self) -> dict[str, Any]:
        return self.log.setup

    def mean(self, key: str) -> float | None:
        """The run's figure for ``key``: a ratio of its totals (or of its windows' weighted sums)."""
        estimate = self.estimates.get(key)
        return estimate.value if estimate is not None else None

    def windows(self, key: str) -> int:
        estimate = self.estimates.get(key)
        return estimate.windows if estimate is not None else 0

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.log.source,
            "kind": self.log.kind,
            "setup": self.log.setup,
            "versions": self.log.versions,
            "windows": len(self.log.windows),
            "windows_used": self.windows_used,
            "figures_from": "run totals" if self.from_totals else "window means weighted by length",
            "means": {key: estimate.value for key, estimate in self.estimates.items()},
        }


def load_run(path: str, label: str, warmup_windows: int) -> RunSamples:
    """Read a run and keep its windows after warm-up; CompareError names the file and what was expected."""
    try:
        log = read_run(path)
    except RunLogError as error:
        raise CompareError(str(error)) from None
    if not log.windows:
        raise CompareError(
            f"no MFU metrics in {log.source} ({log.kind}): expected windows logged by the MFU "
            f"callback ({', '.join(m.SUMMARY_METRICS)}, ...); was it in the run, past its warm-up?"
        )
    figures = run_figures(log, warmup_windows, label)
    estimates = figures.estimates
    if FLOPS_PER_TOKEN not in estimates and isinstance(log.setup.get(FLOPS_PER_TOKEN), (int, float)):
        estimates[FLOPS_PER_TOKEN] = Estimate(float(log.setup[FLOPS_PER_TOKEN]), float("nan"), 1)
    return RunSamples(label, log, estimates, figures.windows_used, figures.from_totals, figures.notes)
