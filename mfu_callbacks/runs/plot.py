"""MFU above loss, against the optimizer step: one run's curves, or several runs' overlaid with a legend.

What ``mfu-callbacks plot`` writes. matplotlib is imported when a plot is drawn, never before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .labels import default_labels
from .logs import Curves, read_curves

_FIGURE_INCHES = (8, 5.5)
_ONE_RUN_COLORS = ("tab:green", "tab:blue")  # MFU, loss
_REASON_CHARS = 300  # of matplotlib's error message, quoted in ours


class PlotError(Exception):
    """The plot cannot be drawn or written (no matplotlib, an unwritable image): one line for the user."""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no window); PlotError without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot needs matplotlib: pip install 'mfu-callbacks[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(paths: Sequence[str], output: str | Path, dpi: int = 120) -> str:
    """Draw the runs at ``paths`` into the image ``output``; return the line that says what was drawn.

    One run is drawn in green (MFU) and blue (loss) and titled by its file; several share a color per
    run and a legend naming each (``labels.default_labels``). Raises RunLogError for a run that cannot
    be read, PlotError without matplotlib or when the image cannot be written.
    """
    runs = [read_curves(path) for path in paths]
    labels: list[str | None] = list(default_labels(list(paths))) if len(runs) > 1 else [None]
    plt = pyplot()
    figure, (mfu_axis, loss_axis) = plt.subplots(
        2, 1, sharex=True, figsize=_FIGURE_INCHES, height_ratios=(1, 1)
    )
    for index, (curves, label) in enumerate(zip(runs, labels)):
        mfu_color, loss_color = _ONE_RUN_COLORS if len(runs) == 1 else (f"C{index % 10}",) * 2
        steps, values = zip(*curves.mfu)
        mfu_axis.plot(steps, [100 * value for value in values], color=mfu_color, marker=".", label=label)
        if curves.loss:
            steps, values = zip(*curves.loss)
            loss_axis.plot(steps, values, color=loss_color, marker=".", label=label)
    mfu_axis.set_ylabel("MFU (%)")
    mfu_axis.set_ylim(bottom=0)
    mfu_axis.grid(alpha=0.3)
    if len(runs) > 1:
        mfu_axis.legend(fontsize=8, loc="lower right")
        mfu_axis.set_title(f"MFU and loss of {len(runs)} runs", fontsize=10)
    else:
        mfu_axis.set_title(f"MFU and loss: {Path(runs[0].source).name}", fontsize=10)
    loss_axis.set_ylabel("loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(output, dpi=dpi)
    except (OSError, ValueError, RuntimeError) as error:
        raise PlotError(f"cannot write {output}: {_reason(error)}") from None
    finally:
        plt.close(figure)
    return f"wrote {output}: {_drawn(runs, labels)}"


def _drawn(runs: list[Curves], labels: list[str | None]) -> str:
    """What the image holds: the points of one run and where they came from, or each run's counts."""
    if len(runs) == 1:
        (curves,) = runs
        return f"{len(curves.mfu)} MFU points, {len(curves.loss)} loss points from {curves.source}"
    return ", ".join(
        f"{label} ({len(curves.mfu)} MFU, {len(curves.loss)} loss points)"
        for label, curves in zip(labels, runs)
    )


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
