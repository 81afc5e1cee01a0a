"""Compare runs by MFU and throughput, with confidence intervals, and gate CI on a drop.

    mfu-callbacks compare main/mfu_summary.json pr/mfu_summary.json
    mfu-callbacks compare runs/main runs/pr --names main,pr --max-drop 2 --json

The first run is the baseline, every other one a candidate. Each run may be a run summary
(``mfu_summary.json`` or its folder), a W&B offline run (folder or ``.wandb`` file), a Lightning
``metrics.csv`` (or its log dir) or a Trainer ``trainer_state.json`` (or its output dir).

**Figures.** Each logged window (one metrics read: the steps since the previous read) is one
sample; the first ``--warmup-windows`` (default 0) of every run are left out, on top of the
meter's own warm-up steps. A run's figure is a ratio of totals, as its end-of-run report divides
them (MFU: all model FLOPs over all GPU-seconds over the peak): a run summary written since 0.2.0
stores the totals, and with no window left out its MFU is the report's. Logs without totals (older
summaries, W&B, ``metrics.csv``, ``trainer_state.json``) weight each window by its length (step
time × steps since the previous window), and the notes say so.

**Difference and interval.** For each metric, the candidate's difference from the baseline is the
ratio of their figures, in percent, and its interval is Welch's t-interval on the log of that ratio
(the ratio estimator's variance from each run's windows, Welch–Satterthwaite degrees of freedom,
two-sided, ``--confidence`` 0.95 by default), turned back into percent: it never reaches -100%.
``padding`` and ``input wait``, fractions that are often zero, are compared in percentage points.
The t quantile is computed here: no scipy. Windows are treated as independent: slow drifts within
a run (thermals, a neighbour on the node) make the interval too narrow, and only another run shows
them.

**Verdict.** "faster" when the interval of tokens/s per GPU lies above zero, "slower" when below,
else "no difference within noise" (the gate's metric decides when a run lacks tokens/s).

**Gate.** Let the *change* be the relative difference of the gate's metric (``--metric``, default
``mfu``), turned for step time so that a negative change is always worse (a step 10% longer is a
speed 9.1% lower), with interval [low, high]. A candidate fails when ``high < -max_drop``: the whole
interval lies below ``-max_drop`` percent, so the metric dropped by more than ``max_drop`` with the
stated confidence (one-sided, ``(1 + confidence) / 2``: 97.5% by default). It passes when the
interval is narrow enough to have seen such a drop (half its width at most ``max_drop``). Otherwise
there are not enough windows to decide: fewer than ``--min-windows`` (default 5) in a run, or an
interval wider than ``max_drop`` (a noisy or short run), and no verdict is given.

Exit codes: 0 every candidate passed, 1 a candidate failed, 3 none failed but one could not be
decided (not enough windows: log more often or train longer), 2 a run cannot be read or compared.
Runs differ by more than their windows do (another node, another day): compare a rerun of the
baseline with the baseline to see how much, and set ``max_drop`` above that.

**Setups.** Runs measured on different GPUs or dtypes are refused unless ``--allow-mismatch``. When
FLOPs per token differ (another model, sequence length, LoRA), MFU and tokens/s answer different
questions: tokens/s per GPU says whether training got faster, MFU whether it uses the GPU better.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as m
from ._intervals import Difference, Estimate, difference, t_quantile, welch_difference
from ._run_figures import FLOPS_PER_TOKEN, run_figures
from ._runlog import RunLog, RunLogError, read_run

__all__ = ["Difference", "Estimate", "compare_runs", "load_run", "t_quantile", "welch_difference"]

EXIT_OK, EXIT_DROP, EXIT_USAGE, EXIT_UNDECIDED = 0, 1, 2, 3
DEFAULT_MIN_WINDOWS = 5  # below this a run's spread says too little to pass or fail anyone
_FLOPS_PER_TOKEN_TOLERANCE = 0.01  # relative: beyond it the runs count different work per token
_GENERIC_NAMES = {"mfu_summary.json", "metrics.csv", "trainer_state.json", "files"}


@dataclass(frozen=True)
class _Row:
    """One compared metric: its table label, how to print it, which way is better, how to compare it."""

    key: str
    label: str
    unit: str  # "percent", "tflops", "rate", "seconds", "flops"
    better: int  # +1 higher is better, -1 lower is better, 0 neither
    points: bool = False  # compared in percentage points, not relative


ROWS = (
    _Row(m.MFU, "MFU", "percent", +1),
    _Row(m.HFU, "HFU", "percent", +1),
    _Row(m.TFLOPS_PER_GPU, "TFLOP/s per GPU", "tflops", +1),
    _Row(m.TOKENS_PER_SEC_PER_GPU, "tokens/s per GPU", "rate", +1),
    _Row(m.STEP_TIME, "step time", "seconds", -1),
    _Row(FLOPS_PER_TOKEN, "FLOPs per token", "flops", 0),
    _Row(m.PADDING_FRACTION, "padding", "percent", -1, points=True),
    _Row(m.INPUT_WAIT_FRACTION, "input wait", "percent", -1, points=True),
)
_ROW = {row.key: row for row in ROWS}
_ROW[m.TOKENS_PER_SEC] = _Row(m.TOKENS_PER_SEC, "tokens/s", "rate", +1)
GATE_METRICS = (m.MFU, m.HFU, m.TFLOPS_PER_GPU, m.TOKENS_PER_SEC_PER_GPU, m.TOKENS_PER_SEC, m.STEP_TIME)
SPEED_METRIC = m.TOKENS_PER_SEC_PER_GPU


class CompareError(Exception):
    """Runs that cannot be compared: printed as one line, exit code 2."""


# -- runs ------------------------------------------------------------------------------------------
@dataclass
class RunSamples:
    """One run as compared: its label, where it was read from, its setup and each metric's figure
    (``_run_figures``) over its windows after warm-up."""

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


def default_labels(paths: list[str]) -> list[str]:
    """A short name per run: the file or folder name (the folder's for files with generic names), with
    parent folders added where names repeat ("a/version_0", "b/version_0")."""
    parts = []
    for path in paths:
        file = Path(path)
        if file.name in _GENERIC_NAMES or file.suffix == ".wandb":
            file = file.parent
        parts.append(file.parts or (str(path),))
    labels = [names[-1] for names in parts]
    for depth in (2, 3, 4):
        repeated = {label for label in labels if labels.count(label) > 1}
        labels = [
            "/".join(names[-depth:]) if label in repeated else label for label, names in zip(labels, parts)
        ]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label}#{index + 1}" if label in repeated else label for index, label in enumerate(labels)]


# -- comparison ------------------------------------------------------------------------------------
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


@dataclass
class Candidate:
    run: RunSamples
    differences: dict[str, Difference]
    verdict: str
    verdict_metric: str | None
    gate: Gate
    notes: list[str] = field(default_factory=list)


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
            "candidates": [
                {
                    **candidate.run.describe(),
                    "differences": {key: value.to_dict() for key, value in candidate.differences.items()},
                    "verdict": candidate.verdict,
                    "verdict_metric": candidate.verdict_metric,
                    "gate": {
                        "metric": candidate.gate.metric,
                        "max_drop_pct": candidate.gate.max_drop,
                        "change": candidate.gate.change.to_dict() if candidate.gate.change else None,
                        "verdict": candidate.gate.verdict,
                        "failed": candidate.gate.failed,
                        "reason": candidate.gate.reason,
                    },
                    "notes": candidate.notes,
                }
                for candidate in self.candidates
            ],
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
    for run in (baseline, *candidates):
        if run.windows(metric) == 0:
            raise CompareError(
                f"{run.log.source} has no window with {metric} after warm-up "
                f"({run.windows_used} of {len(run.log.windows)} windows used) "
                + (
                    "(lower --warmup-windows or log more often)"
                    if metric in _any_window_keys(run)
                    else f"(this run did not log {metric}; was a peak known? try --metric {SPEED_METRIC})"
                )
            )
    comparison = Comparison(baseline, [], confidence)
    comparison.notes.extend([*baseline.log.notes, *baseline.notes])
    for run in candidates:
        notes = [*run.log.notes, *run.notes, *_setup_notes(baseline, run, allow_mismatch)]
        differences = {}
        for key, row in _ROW.items():
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
                _verdict(differences.get(verdict_metric), _ROW[verdict_metric]),
                verdict_metric,
                _gate(differences.get(metric), metric, max_drop, (baseline, run), min_windows),
                notes,
            )
        )
    return comparison


def _any_window_keys(run: RunSamples) -> set[str]:
    return {key for _, values in run.log.windows for key in values}


def _oriented(difference: Difference | None, row: _Row) -> Difference | None:
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


def _verdict(difference: Difference | None, row: _Row) -> str:
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
    change = _oriented(difference, _ROW[metric])
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


def _same(first: Any, second: Any) -> bool:
    return str(first).strip().lower() == str(second).strip().lower()


def _setup_notes(baseline: RunSamples, run: RunSamples, allow_mismatch: bool) -> list[str]:
    """Refuse runs measured on other GPUs or dtypes (unless allowed); notes on what else differs."""
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


# -- output ----------------------------------------------------------------------------------------
def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "percent":
        return f"{100 * value:.1f}%"
    if unit == "tflops":
        return f"{value:.1f}"
    if unit == "rate":
        return f"{value:,.0f}"
    if unit == "seconds":
        return f"{1e3 * value:.1f} ms" if value < 10 else f"{value:.2f} s"
    return f"{value:.4g}"


def _format_difference(difference: Difference | None) -> str:
    if difference is None:
        return ""
    digits = 2 if difference.high - difference.low < 2 else 1
    unit = "%" if difference.scale == "percent" else " pt"
    estimate, low, high = (
        round(value, digits) + 0.0 for value in (difference.estimate, difference.low, difference.high)
    )
    return f"{estimate:+.{digits}f}{unit} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _setup_cell(run: RunSamples, key: str) -> str:
    setup = run.setup
    if key == "peak":
        peak = setup.get("peak_tflops")
        return f"{float(peak):.1f}" if isinstance(peak, (int, float)) else "-"
    if key == "model":
        model = setup.get("model")
        if not isinstance(model, dict):
            return "-"
        text = f"{model.get('architecture', '?')}"
        if isinstance(model.get("parameters"), int):
            text += f" {model['parameters'] / 1e6:,.1f}M"
        lora = model.get("lora")
        if isinstance(lora, dict):
            text += f" LoRA r={lora.get('r')}"
        return text
    value = setup.get(key)
    return "-" if value is None else str(value)


def format_table(comparison: Comparison) -> str:
    """The side-by-side table, then one verdict line per candidate and the notes."""
    runs = [comparison.baseline, *(candidate.run for candidate in comparison.candidates)]
    level = f"{comparison.confidence:.0%}"
    header = ["", comparison.baseline.label]
    for candidate in comparison.candidates:
        header += [candidate.run.label, f"vs {comparison.baseline.label} ({level} CI)"]
    lines = [header]

    def add(label: str, cells: list[str], differences: list[str] | None = None) -> None:
        row = [label, cells[0]]
        for index, cell in enumerate(cells[1:]):
            row += [cell, differences[index] if differences else ""]
        lines.append(row)

    add("read from", [run.log.kind for run in runs])
    for key, label in (
        ("device", "device"),
        ("peak", "peak TFLOP/s"),
        ("dtype", "dtype"),
        ("world_size", "world size"),
        ("model", "model"),
    ):
        cells = [_setup_cell(run, key) for run in runs]
        if any(cell != "-" for cell in cells):
            add(label, cells)
    add("windows used", [f"{run.windows_used} of {len(run.log.windows)}" for run in runs])
    for row in ROWS:
        if not any(row.key in run.estimates for run in runs):
            continue
        add(
            row.label,
            [_format_value(run.mean(row.key), row.unit) for run in runs],
            [_format_difference(candidate.differences.get(row.key)) for candidate in comparison.candidates],
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    ]
    text.append("")
    for candidate in comparison.candidates:
        text.append(_verdict_line(candidate, level))
    notes = comparison.notes + [note for candidate in comparison.candidates for note in candidate.notes]
    if notes:
        text.append("notes:")
        text.extend(f"  - {note}" for note in notes)
    return "\n".join(text)


def _verdict_line(candidate: Candidate, level: str) -> str:
    speed = candidate.differences.get(candidate.verdict_metric) if candidate.verdict_metric else None
    line = f"{candidate.run.label}: {candidate.verdict}"
    if speed is not None and candidate.verdict_metric:
        line += f" ({_ROW[candidate.verdict_metric].label} {_format_difference(speed)})"
    gate = candidate.gate
    if gate.failed and gate.change is not None:
        bound = f"{gate.change.high:+.2f}%"
        line += f"; gate on {gate.metric}: FAIL, dropped more than {gate.max_drop:g}% ({level} interval ends at {bound})"
    elif gate.undecided:
        line += f"; gate on {gate.metric}: {gate.reason}"
    else:
        line += f"; gate on {gate.metric}: pass (max drop {gate.max_drop:g}%)"
    return line


# -- several runs in one plot ------------------------------------------------------------------------
def plot_runs(paths: list[str], output: str, dpi: int = 120) -> None:
    """Overlay the MFU curves (above) and loss curves (below) of several runs, a legend naming each.

    Raises RunLogError for a run it cannot read and CompareError without matplotlib.
    """
    from ._runlog import read_curves

    runs = [read_curves(path) for path in paths]
    try:
        import matplotlib
    except ImportError:
        raise CompareError("plot needs matplotlib: pip install 'mfu-callbacks[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = default_labels(paths)
    figure, (mfu_axis, loss_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5), height_ratios=(1, 1))
    for index, (curves, label) in enumerate(zip(runs, labels)):
        color = f"C{index % 10}"
        steps, values = zip(*curves.mfu)
        mfu_axis.plot(steps, [100 * value for value in values], color=color, marker=".", label=label)
        if curves.loss:
            steps, values = zip(*curves.loss)
            loss_axis.plot(steps, values, color=color, marker=".", label=label)
    mfu_axis.set_ylabel("MFU (%)")
    mfu_axis.set_ylim(bottom=0)
    mfu_axis.grid(alpha=0.3)
    mfu_axis.legend(fontsize=8, loc="lower right")
    mfu_axis.set_title(f"MFU and loss of {len(runs)} runs", fontsize=10)
    loss_axis.set_ylabel("loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(output, dpi=dpi)
    except OSError as error:
        raise CompareError(f"cannot write {output}: {error}") from None
    finally:
        plt.close(figure)
    counts = ", ".join(
        f"{label} ({len(curves.mfu)} MFU, {len(curves.loss)} loss points)"
        for label, curves in zip(labels, runs)
    )
    print(f"wrote {output}: {counts}")


# -- command line ----------------------------------------------------------------------------------
def add_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compare`` command to the ``mfu-callbacks`` subcommands; its handler is :func:`run`."""
    parser = subcommands.add_parser(
        "compare",
        help="compare runs' MFU and throughput with confidence intervals; gate CI on a drop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 no drop beyond --max-drop, 1 a candidate dropped, 2 a run could not be read or "
        "compared, 3 not enough windows to decide (fewer than --min-windows, or an interval wider than "
        "--max-drop).\nexamples:\n  mfu-callbacks compare runs/main runs/pr\n"
        "  mfu-callbacks compare main/mfu_summary.json pr/mfu_summary.json --max-drop 3 --json",
    )
    parser.add_argument("baseline", help="the run to compare against")
    parser.add_argument("candidates", nargs="+", metavar="candidate", help="runs compared with the baseline")
    parser.add_argument(
        "--metric", default=m.MFU, choices=GATE_METRICS, help="what the gate watches (default: mfu)"
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=2.0,
        metavar="PCT",
        help="fail when the metric dropped by more than PCT percent with confidence (default: 2)",
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="two-sided interval level (default: 0.95)"
    )
    parser.add_argument(
        "--warmup-windows",
        type=int,
        default=0,
        metavar="N",
        help="windows left out at the start of every run, on top of the meter's warm-up steps (default: 0, "
        "which gives a run summary the figures of its own report)",
    )
    parser.add_argument(
        "--min-windows",
        type=int,
        default=DEFAULT_MIN_WINDOWS,
        metavar="N",
        help=f"windows each run needs for a gate verdict; fewer: exit code 3 (default: {DEFAULT_MIN_WINDOWS})",
    )
    parser.add_argument(
        "--names", help="comma-separated labels, baseline first (default: file or folder names)"
    )
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="compare runs on different GPUs or dtypes"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``compare``: print the table (or JSON) and return the exit code (0, 1, 3, or 2 after one error line)."""
    try:
        comparison = _compare(args)
    except CompareError as error:
        print(f"mfu-callbacks: error: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"exit_code": EXIT_USAGE, "error": str(error)}))
        return EXIT_USAGE
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2, allow_nan=False, default=str))
    else:
        print(format_table(comparison))
    return comparison.exit_code


def _compare(args: argparse.Namespace) -> Comparison:
    paths = [args.baseline, *args.candidates]
    if args.warmup_windows < 0:
        raise CompareError(f"--warmup-windows must be >= 0, got {args.warmup_windows}")
    labels = default_labels(paths)
    if args.names:
        labels = [name.strip() for name in args.names.split(",")]
        if len(labels) != len(paths) or len(set(labels)) != len(labels) or not all(labels):
            raise CompareError(
                f"--names needs {len(paths)} distinct names, baseline first; got {args.names!r}"
            )
    runs = [load_run(path, label, args.warmup_windows) for path, label in zip(paths, labels)]
    return compare_runs(
        runs[0],
        runs[1:],
        metric=args.metric,
        max_drop=args.max_drop,
        confidence=args.confidence,
        allow_mismatch=args.allow_mismatch,
        min_windows=args.min_windows,
    )
