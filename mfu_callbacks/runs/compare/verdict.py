"""Each candidate against the baseline: its differences with intervals, a verdict ("faster", "slower",
"no difference within noise") and the gate ("pass", "fail", "undecided"), with the exit code they give.

The rules are in the package docstring (``mfu_callbacks.runs.compare``): Verdict and Gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ... import metrics as m
from .intervals import Difference, difference
from .rows import GATE_METRICS, ROW_OF, SPEED_METRIC, Row
from .samples import CompareError, RunSamples
from .setups import setup_notes

EXIT_OK, EXIT_DROP, EXIT_UNDECIDED = 0, 1, 3
DEFAULT_MIN_WINDOWS = 5  # below this a run's spread says too little to pass or fail anyone


@dataclass
class Gate:
    """The gate's verdict on one candidate: "fail", "pass" or "undecided" (not enough windows to decide)."""

    metric: str
    max_drop: float
    change: Difference | None  # sign turned so that negative is worse
    verdict: str
    reason: str = ""  # why undecided

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"

    @property
    def undecided(self) -> bool:
        return self.verdict == "undecided"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "max_drop_pct": self.max_drop,
            "change": self.change.to_dict() if self.change else None,
            "verdict": self.verdict,
            "failed": self.failed,
            "reason": self.reason,
        }


@dataclass
class Candidate:
    run: RunSamples
    differences: dict[str, Difference]
    verdict: str
    verdict_metric: str | None
    gate: Gate
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.run.describe(),
            "differences": {key: value.to_dict() for key, value in self.differences.items()},
            "verdict": self.verdict,
            "verdict_metric": self.verdict_metric,
            "gate": self.gate.to_dict(),
            "notes": self.notes,
        }


@dataclass
class Comparison:
    """The baseline, each candidate's differences, verdict and gate, and what the reader should know."""

    baseline: RunSamples
    candidates: list[Candidate]
    confidence: float
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when a candidate failed, else 3 when one could not be decided, else 0."""
        if any(candidate.gate.failed for candidate in self.candidates):
            return EXIT_DROP
        if any(candidate.gate.undecided for candidate in self.candidates):
            return EXIT_UNDECIDED
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "welch-t on log ratios",
            "confidence": self.confidence,
            "exit_code": self.exit_code,
            "baseline": self.baseline.describe(),
            "candidates": [candidate.to_dict() for candidate in self.candidates],
            "notes": self.notes,
        }


def compare_runs(
    baseline: RunSamples,
    candidates: list[RunSamples],
    *,
    metric: str = m.MFU,
    max_drop: float = 2.0,
    confidence: float = 0.95,
    allow_mismatch: bool = False,
    min_windows: int = DEFAULT_MIN_WINDOWS,
) -> Comparison:
    """Each candidate against the baseline: differences with intervals, a verdict, and the gate on ``metric``."""
    _check_options(metric, max_drop, confidence, min_windows)
    for run in (baseline, *candidates):
        _check_has_metric(run, metric)
    comparison = Comparison(baseline, [], confidence)
    comparison.notes.extend([*baseline.log.notes, *baseline.notes])
    for run in candidates:
        notes = [*run.log.notes, *run.notes, *setup_notes(baseline, run, allow_mismatch)]
        differences = {}
        for key, row in ROW_OF.items():
            first, second = baseline.estimates.get(key), run.estimates.get(key)
            change = (
                difference(first, second, confidence, points=row.points)
                if first is not None and second is not None
                else None
            )
            if change is not None:
                differences[key] = change
        verdict_metric = SPEED_METRIC if SPEED_METRIC in differences else metric
        comparison.candidates.append(
            Candidate(
                run,
                differences,
                _verdict(differences.get(verdict_metric), ROW_OF[verdict_metric]),
                verdict_metric,
                _gate(differences.get(metric), metric, max_drop, (baseline, run), min_windows),
                notes,
            )
        )
    return comparison


def _check_options(metric: str, max_drop: float, confidence: float, min_windows: int) -> None:
    if metric not in GATE_METRICS:
        raise CompareError(f"--metric {metric!r} cannot gate; choose one of {', '.join(GATE_METRICS)}")
    if not 0 < confidence < 1:
        raise CompareError(f"--confidence must lie between 0 and 1, got {confidence}")
    if not max_drop >= 0:
        raise CompareError(f"--max-drop must be a percentage >= 0, got {max_drop}")
    if min_windows < 2:
        raise CompareError(
            f"--min-windows must be at least 2 (an interval needs a spread), got {min_windows}"
        )


def _check_has_metric(run: RunSamples, metric: str) -> None:
    """A run without a window of the gate's metric after warm-up: why, and what to try."""
    if run.windows(metric) > 0:
        return
    logged = {key for _, values in run.log.windows for key in values}
    raise CompareError(
        f"{run.log.source} has no window with {metric} after warm-up "
        f"({run.windows_used} of {len(run.log.windows)} windows used) "
        + (
            "(lower --warmup-windows or log more often)"
            if metric in logged
            else f"(this run did not log {metric}; was a peak known? try --metric {SPEED_METRIC})"
        )
    )


def _oriented(difference: Difference | None, row: Row) -> Difference | None:
    """The difference turned where lower is better, so that negative is always worse: a step time
    10% longer is a speed 9.1% lower (the ratio inverted); percentage points change sign."""
    if difference is None or row.better >= 0:
        return difference
    if difference.scale == "points":
        return Difference(-difference.estimate, -difference.high, -difference.low, difference.df, "points")

    def inverted(percent: float) -> float:
        return 100.0 * (100.0 / (100.0 + percent) - 1.0)

    return Difference(
        inverted(difference.estimate),
        inverted(difference.high),
        inverted(difference.low),
        difference.df,
        difference.scale,
    )


def _verdict(difference: Difference | None, row: Row) -> str:
    change = _oriented(difference, row)
    if change is None:
        return "no verdict (too few windows)"
    if change.low > 0:
        return "faster"
    if change.high < 0:
        return "slower"
    return "no difference within noise"


def _gate(
    difference: Difference | None,
    metric: str,
    max_drop: float,
    runs: tuple[RunSamples, RunSamples],
    min_windows: int,
) -> Gate:
    """Fail when the whole interval lies below -max_drop; pass when it is narrow enough to have seen
    such a drop (half-width <= max_drop); else undecided, as with fewer than ``min_windows`` a run."""
    change = _oriented(difference, ROW_OF[metric])
    short = [f"{run.label} has {run.windows(metric)}" for run in runs if run.windows(metric) < min_windows]
    if short:
        reason = (
            f"not enough windows to decide: {' and '.join(short)} window(s) with {metric}, the gate needs "
            f"{min_windows} per run (--min-windows): log more often or train longer"
        )
        return Gate(metric, max_drop, change, "undecided", reason)
    assert change is not None  # two windows a side give an interval
    if change.high < -max_drop:
        return Gate(metric, max_drop, change, "fail")
    if (change.high - change.low) / 2.0 > max_drop:
        reason = (
            f"not enough windows to decide: the interval [{change.low:+.1f}%, {change.high:+.1f}%] is wider "
            f"than ±{max_drop:g}%, so a drop of {max_drop:g}% could pass unseen: more windows (or a steadier "
            "machine) narrow it"
        )
        return Gate(metric, max_drop, change, "undecided", reason)
    return Gate(metric, max_drop, change, "pass")
