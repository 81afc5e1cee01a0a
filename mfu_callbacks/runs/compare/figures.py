"""A run's figures as ``compare`` shows them: ratios of the run's totals, as its own report divides them.

MFU is the model FLOPs of every measured step over their GPU-seconds over the peak (``metrics.py``:
"totals over totals, never means of per-step ratios"). A run summary written since 0.2.0 stores the
totals each window added and the run's totals (``runs/summary.py``): the figure of a run is then
computed from them exactly, and with no window left out (``--warmup-windows 0``, the default) it is
the end-of-run report's. Logs without totals (older summaries, W&B, Lightning ``metrics.csv``,
``trainer_state.json``) hold each window's ratios only: each is weighted by the window's length (its
step time × the optimizer steps since the previous window), which is the ratio of totals when the
step counts between windows are right, and close to it otherwise; the run's notes say so.

Every figure's interval comes from the spread of its windows (``intervals.ratio_estimate``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ... import metrics as m
from ..logs import RunLog
from .intervals import Estimate, ratio_estimate

FLOPS_PER_TOKEN = "model_flops_per_token"  # derived per window: TFLOP/s per GPU over tokens/s per GPU

# key: (numerator, denominator) of its totals; MFU and HFU are divided by the peak as well.
_FROM_TOTALS: dict[str, tuple[str, str]] = {
    m.MFU: ("model_flops", "gpu_seconds"),
    m.HFU: ("hardware_flops", "gpu_seconds"),
    m.TFLOPS_PER_GPU: ("model_flops", "gpu_seconds"),
    m.TOKENS_PER_SEC_PER_GPU: ("tokens", "gpu_seconds"),
    m.TOKENS_PER_SEC: ("tokens", "wall_seconds"),
    m.STEP_TIME: ("wall_seconds", "steps"),
    FLOPS_PER_TOKEN: ("model_flops", "tokens"),
    m.PADDING_FRACTION: ("padding_tokens", "padded_tokens"),
    m.INPUT_WAIT_FRACTION: ("", "wall_seconds"),  # no total of its own: weighted by the window's time
}
_SCALE = {m.TFLOPS_PER_GPU: 1e-12}
_PEAK_DIVIDED = (m.MFU, m.HFU)


@dataclass
class RunFigures:
    """Each metric's figure with its variance, the windows used, and how the figures were obtained."""

    estimates: dict[str, Estimate]
    windows_used: int
    from_totals: bool
    notes: list[str] = field(default_factory=list)


def run_figures(log: RunLog, warmup_windows: int, label: str) -> RunFigures:
    """The figures of ``log`` after its first ``warmup_windows`` windows."""
    used = log.windows[warmup_windows:]
    totals = [log.window_totals.get(step) for step, _ in used]
    if used and all(total is not None for total in totals):
        window_totals = [_with_padding(total) for total in totals if total is not None]
        run, note = _used_run_totals(log, warmup_windows, window_totals)
        figures = RunFigures(_from_totals(used, window_totals, run, log), len(used), True)
        if note:
            figures.notes.append(f"{label}: {note}")
        return figures
    figures = RunFigures(_from_lengths(used), len(used), False)
    if used:
        figures.notes.append(
            f"{label}: {log.kind} holds no run totals (written before mfu-callbacks 0.2.0, or a framework's "
            "log): its figures are window means weighted by each window's length (step time × steps), "
            "close to the run's report but not exactly it"
        )
    return figures


def _with_padding(totals: Mapping[str, float]) -> dict[str, float]:
    padded, tokens = totals.get("padded_tokens"), totals.get("tokens")
    extra = {"padding_tokens": padded - tokens} if padded is not None and tokens is not None else {}
    return {**totals, **extra}


def _used_run_totals(
    log: RunLog, warmup_windows: int, used: list[dict[str, float]]
) -> tuple[dict[str, float], str | None]:
    """The totals of the steps compared: the run's (its report's, tail after the last window included)
    less the windows left out; the used windows' sum when the header is older than the windows."""
    summed = {key: sum(total.get(key, 0.0) for total in used) for key in used[0]}
    run = log.run_totals
    if run is None:
        return (
            summed,
            "the summary's header holds no run totals (a run killed before its end?): figures from its windows",
        )
    dropped = [_with_padding(log.window_totals[step]) for step, _ in log.windows[:warmup_windows]]
    remaining = {
        key: value - sum(total.get(key, 0.0) for total in dropped)
        for key, value in _with_padding(run).items()
    }
    if remaining.get("steps", 0.0) < summed.get("steps", 0.0):
        return (
            summed,
            "its header's run totals are older than its windows (a run killed before its end?): figures from its windows",
        )
    return remaining, None


def _ratio(totals: Mapping[str, float], key: str, peak: float | None) -> float | None:
    numerator, denominator = _FROM_TOTALS[key]
    top, bottom = totals.get(numerator), totals.get(denominator)
    if top is None or not bottom or bottom <= 0:
        return None
    value = top / bottom * _SCALE.get(key, 1.0)
    if key in _PEAK_DIVIDED:
        return value / peak if peak else None
    return value


def _peak(log: RunLog) -> float | None:
    if log.run_totals and log.run_totals.get("peak_flops"):
        return log.run_totals["peak_flops"]
    tflops = log.setup.get("peak_tflops")
    return float(tflops) * 1e12 if isinstance(tflops, (int, float)) and tflops > 0 else None


def _from_totals(
    used: list[tuple[float, dict[str, float]]],
    totals: list[dict[str, float]],
    run: Mapping[str, float],
    log: RunLog,
) -> dict[str, Estimate]:
    peak = _peak(log)
    estimates: dict[str, Estimate] = {}
    for key, (_, denominator) in _FROM_TOTALS.items():
        pairs = [
            (value, total.get(denominator, 0.0))
            for (_, values), total in zip(used, totals)
            if (value := _window_value(values, key)) is not None
        ]
        if not pairs:
            continue
        whole = _ratio(run, key, peak) if key != m.INPUT_WAIT_FRACTION else None
        estimate = ratio_estimate([value for value, _ in pairs], [weight for _, weight in pairs], value=whole)
        if estimate is not None:
            estimates[key] = estimate
    return estimates


def _window_value(values: Mapping[str, float], key: str) -> float | None:
    if key != FLOPS_PER_TOKEN:
        return values.get(key)
    tflops, tokens = values.get(m.TFLOPS_PER_GPU), values.get(m.TOKENS_PER_SEC_PER_GPU)
    return tflops * 1e12 / tokens if tflops is not None and tokens else None


# Without totals: what each metric's windows are weighted by, from the window's length in seconds and
# in optimizer steps (its denominator, as with totals).
_WEIGHT: dict[str, Callable[[Mapping[str, float], float, float], float]] = {
    m.STEP_TIME: lambda values, seconds, steps: steps,
    FLOPS_PER_TOKEN: lambda values, seconds, steps: values.get(m.TOKENS_PER_SEC_PER_GPU, 0.0) * seconds,
}


def _from_lengths(used: list[tuple[float, dict[str, float]]]) -> dict[str, Estimate]:
    steps = _steps_per_window([step for step, _ in used])
    estimates: dict[str, Estimate] = {}
    for key in _FROM_TOTALS:
        samples, weights = [], []
        for (_, values), count in zip(used, steps):
            value = _window_value(values, key)
            if value is None:
                continue
            seconds = values.get(m.STEP_TIME, 0.0) * count
            samples.append(value)
            weights.append(_WEIGHT.get(key, lambda values, seconds, steps: seconds)(values, seconds, count))
        estimate = ratio_estimate(samples, weights)
        if estimate is not None:
            estimates[key] = estimate
    return estimates


def _steps_per_window(steps: list[float]) -> list[float]:
    """Optimizer steps each window holds, from the steps it was read at: the first window's and any
    that cannot be told (a repeated step) are the median of the others (1 when none is known)."""
    gaps = [later - earlier for earlier, later in zip(steps, steps[1:])]
    known = [gap for gap in gaps if gap > 0]
    typical = statistics.median(known) if known else 1.0
    return [typical] + [gap if gap > 0 else typical for gap in gaps]
