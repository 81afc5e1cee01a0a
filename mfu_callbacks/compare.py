"""Compare runs by MFU and throughput, with confidence intervals, and gate CI on a drop.

    mfu-callbacks compare main/mfu_summary.json pr/mfu_summary.json
    mfu-callbacks compare runs/main runs/pr --names main,pr --max-drop 2 --json

The first run is the baseline, every other one a candidate. Each run may be a run summary
(``mfu_summary.json`` or its folder), a W&B offline run (folder or ``.wandb`` file), a Lightning
``metrics.csv`` (or its log dir) or a Trainer ``trainer_state.json`` (or its output dir).

**Samples.** Each logged window (one metrics read: the steps since the previous read) is one
sample; the first ``--warmup-windows`` (default 1) of every run are left out, on top of the
meter's own warm-up steps. A run's value is the mean of its windows (the meter's run summary,
totals over totals, weights windows by their length and can differ slightly).

**Difference and interval.** For each metric, the candidate's difference from the baseline is
the difference of the window means divided by the baseline's mean, in percent (``padding
fraction`` and ``input wait``, fractions that are often zero, are compared in percentage points
instead). Its interval is Welch's t-interval on the difference of means (unequal variances,
Welch–Satterthwaite degrees of freedom, two-sided, ``--confidence`` 0.95 by default), divided by
the baseline's mean; the uncertainty of that mean as a divisor is ignored (second order while
the interval is narrow). The t quantile is computed here (the regularized incomplete beta
function by its continued fraction, inverted by bisection): no scipy. Windows are treated as
independent: slow drifts within a run (thermals, a neighbour on the node) make the interval too
narrow, and only another run shows them.

**Verdict.** "faster" when the interval of tokens/s per GPU lies above zero, "slower" when below,
else "no difference within noise" (the gate's metric decides when a run lacks tokens/s).

**Gate.** Let the *change* be the relative difference of the gate's metric (``--metric``, default
``mfu``), its sign turned for step time so that a negative change is always worse, with interval
[low, high]. A candidate fails when ``high < -max_drop``: the whole interval lies below
``-max_drop`` percent, so the metric dropped by more than ``max_drop`` with the stated confidence
(one-sided, ``(1 + confidence) / 2``: 97.5% by default). Exit code 1 when any candidate fails,
0 otherwise, 2 when a run cannot be read or compared. A noisy run widens the interval and so
passes more easily: the output says so when the interval is wider than ``max_drop``. Runs differ
by more than their windows do (another node, another day): compare a rerun of the baseline with
the baseline to see how much, and set ``max_drop`` above that.

**Setups.** Runs measured on different GPUs or dtypes are refused unless ``--allow-mismatch``. When
FLOPs per token differ (another model, sequence length, LoRA), MFU and tokens/s answer different
questions: tokens/s per GPU says whether training got faster, MFU whether it uses the GPU better.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as m
from ._runlog import RunLog, RunLogError, read_run

EXIT_OK, EXIT_DROP, EXIT_USAGE = 0, 1, 2
FLOPS_PER_TOKEN = "model_flops_per_token"  # derived per window: TFLOP/s per GPU over tokens/s per GPU
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


# -- statistics ------------------------------------------------------------------------------------
def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for step in range(1, 500):
        for numerator in (
            step * (b - step) * x / ((a + 2 * step - 1) * (a + 2 * step)),
            -(a + step) * (a + b + step) * x / ((a + 2 * step) * (a + 2 * step + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def _beta_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile (above 0.5) of Student's t with ``df`` degrees of freedom (any df > 0).

    Two-sided tail P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2), solved for t by bisection; infinite df
    is the normal quantile.
    """
    if not 0.5 <= probability < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 <= probability < 1 and df > 0, got {probability}, {df}")
    if math.isinf(df) or df > 1e7:
        return statistics.NormalDist().inv_cdf(probability)
    tail = 2.0 * (1.0 - probability)

    def two_sided_tail(t: float) -> float:
        return _beta_regularized(df / 2.0, 0.5, df / (df + t * t))

    low, high = 0.0, 1.0
    while two_sided_tail(high) > tail:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if two_sided_tail(middle) > tail:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Difference:
    """Candidate minus baseline: the point estimate and its interval, in the unit of ``scale``."""

    estimate: float
    low: float
    high: float
    df: float
    scale: str  # "percent" (relative to the baseline mean) or "points" (percentage points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "df": self.df if math.isfinite(self.df) else None,
            "scale": self.scale,
        }


def welch_difference(
    baseline: list[float], candidate: list[float], confidence: float, *, points: bool = False
) -> Difference | None:
    """Welch's t-interval on mean(candidate) - mean(baseline), relative to mean(baseline) in percent
    (or in percentage points of a fraction); None with fewer than 2 samples a side or a zero baseline."""
    n1, n2 = len(baseline), len(candidate)
    if n1 < 2 or n2 < 2:
        return None
    mean1, mean2 = statistics.fmean(baseline), statistics.fmean(candidate)
    spread1, spread2 = statistics.variance(baseline, mean1) / n1, statistics.variance(candidate, mean2) / n2
    error = math.sqrt(spread1 + spread2)
    if error > 0:
        df = (spread1 + spread2) ** 2 / (spread1**2 / (n1 - 1) + spread2**2 / (n2 - 1))
    else:
        df = math.inf
    half = t_quantile((1.0 + confidence) / 2.0, df) * error
    difference = mean2 - mean1
    if points:
        scale = 100.0
    elif mean1 != 0:
        scale = 100.0 / abs(mean1)
    else:
        return None
    return Difference(
        difference * scale,
        (difference - half) * scale,
        (difference + half) * scale,
        df,
        "points" if points else "percent",
    )


# -- runs ------------------------------------------------------------------------------------------
@dataclass
class RunSamples:
    """One run as compared: its label, where it was read from, its setup and its samples after warm-up."""

    label: str
    log: RunLog
    samples: dict[str, list[float]]
    windows_used: int

    @property
    def setup(self) -> dict[str, Any]:
        return self.log.setup

    def mean(self, key: str) -> float | None:
        values = self.samples.get(key)
        return statistics.fmean(values) if values else None

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.log.source,
            "kind": self.log.kind,
            "setup": self.log.setup,
            "versions": self.log.versions,
            "windows": len(self.log.windows),
            "windows_used": self.windows_used,
            "means": {key: self.mean(key) for key in self.samples},
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
    used = log.windows[warmup_windows:]
    samples: dict[str, list[float]] = {}
    for _, values in used:
        for key, value in values.items():
            samples.setdefault(key, []).append(value)
        tflops, tokens = values.get(m.TFLOPS_PER_GPU), values.get(m.TOKENS_PER_SEC_PER_GPU)
        if tflops is not None and tokens:
            samples.setdefault(FLOPS_PER_TOKEN, []).append(tflops * 1e12 / tokens)
    if FLOPS_PER_TOKEN not in samples and isinstance(log.setup.get(FLOPS_PER_TOKEN), (int, float)):
        samples[FLOPS_PER_TOKEN] = [float(log.setup[FLOPS_PER_TOKEN])]
    return RunSamples(label, log, samples, len(used))


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
    metric: str
    max_drop: float
    change: Difference | None  # sign turned so that negative is worse
    failed: bool
    resolvable: bool  # the interval is narrow enough to see a drop of max_drop


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
        return EXIT_DROP if any(candidate.gate.failed for candidate in self.candidates) else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "welch-t",
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
                        "failed": candidate.gate.failed,
                        "resolvable": candidate.gate.resolvable,
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
) -> Comparison:
    """Each candidate against the baseline: differences with intervals, a verdict, and the gate on ``metric``."""
    if metric not in GATE_METRICS:
        raise CompareError(f"--metric {metric!r} cannot gate; choose one of {', '.join(GATE_METRICS)}")
    if not 0 < confidence < 1:
        raise CompareError(f"--confidence must lie between 0 and 1, got {confidence}")
    if not max_drop >= 0:
        raise CompareError(f"--max-drop must be a percentage >= 0, got {max_drop}")
    for run in (baseline, *candidates):
        if len(run.samples.get(metric, [])) < 2:
            raise CompareError(
                f"{run.log.source} has {len(run.samples.get(metric, []))} window(s) with {metric} after warm-up "
                f"({run.windows_used} of {len(run.log.windows)} windows used): a comparison needs at least 2 "
                + (
                    "(lower --warmup-windows or log more often)"
                    if metric in _any_window_keys(run)
                    else f"(this run did not log {metric}; was a peak known? try --metric {SPEED_METRIC})"
                )
            )
    comparison = Comparison(baseline, [], confidence)
    comparison.notes.extend(baseline.log.notes)
    for run in candidates:
        notes = [*run.log.notes, *_setup_notes(baseline, run, allow_mismatch)]
        differences = {}
        for key, row in _ROW.items():
            difference = welch_difference(
                baseline.samples.get(key, []), run.samples.get(key, []), confidence, points=row.points
            )
            if difference is not None:
                differences[key] = difference
        verdict_metric = SPEED_METRIC if SPEED_METRIC in differences else metric
        comparison.candidates.append(
            Candidate(
                run,
                differences,
                _verdict(differences.get(verdict_metric), _ROW[verdict_metric]),
                verdict_metric,
                _gate(differences.get(metric), metric, max_drop),
                notes,
            )
        )
    return comparison


def _any_window_keys(run: RunSamples) -> set[str]:
    return {key for _, values in run.log.windows for key in values}


def _oriented(difference: Difference | None, row: _Row) -> Difference | None:
    """The difference with its sign turned where lower is better: negative is then always worse."""
    if difference is None or row.better >= 0:
        return difference
    return Difference(
        -difference.estimate, -difference.high, -difference.low, difference.df, difference.scale
    )


def _verdict(difference: Difference | None, row: _Row) -> str:
    change = _oriented(difference, row)
    if change is None:
        return "no verdict (too few samples)"
    if change.low > 0:
        return "faster"
    if change.high < 0:
        return "slower"
    return "no difference within noise"


def _gate(difference: Difference | None, metric: str, max_drop: float) -> Gate:
    change = _oriented(difference, _ROW[metric])
    if change is None:
        return Gate(metric, max_drop, None, False, False)
    half_width = (change.high - change.low) / 2.0
    return Gate(metric, max_drop, change, change.high < -max_drop, half_width <= max_drop)


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
        if not any(row.key in run.samples for run in runs):
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
    for candidate in comparison.candidates:
        gate = candidate.gate
        if gate.change is not None and not gate.resolvable:
            notes.append(
                f"{candidate.run.label}: the {gate.metric} interval is wider than ±{gate.max_drop:g}%: a "
                f"drop of {gate.max_drop:g}% could pass unseen; more windows narrow it"
            )
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
    if gate.change is not None:
        bound = f"{gate.change.high:+.2f}%"
        line += (
            f"; gate on {gate.metric}: FAIL, dropped more than {gate.max_drop:g}% ({level} interval ends at {bound})"
            if gate.failed
            else f"; gate on {gate.metric}: pass (max drop {gate.max_drop:g}%)"
        )
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
        "compared.\nexamples:\n  mfu-callbacks compare runs/main runs/pr\n"
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
        default=1,
        metavar="N",
        help="windows left out at the start of every run (default: 1)",
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
    """Run ``compare``: print the table (or JSON) and return the exit code (0, 1, or 2 after one error line)."""
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
    )
