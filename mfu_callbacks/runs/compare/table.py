"""The comparison as text: the runs side by side, one verdict line per candidate, then the notes."""

from __future__ import annotations

from .intervals import Difference
from .rows import ROW_OF, ROWS
from .samples import RunSamples
from .verdict import Candidate, Comparison

# Setup rows of the table, shown when any run records them.
_SETUP_ROWS = (
    ("device", "device"),
    ("peak", "peak TFLOP/s"),
    ("dtype", "dtype"),
    ("world_size", "world size"),
    ("model", "model"),
)


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
    for key, label in _SETUP_ROWS:
        cells = [_setup_cell(run, key) for run in runs]
        if any(cell != "-" for cell in cells):
            add(label, cells)
    add("windows used", [f"{run.windows_used} of {len(run.log.windows)}" for run in runs])
    for row in ROWS:
        if not any(row.key in run.estimates for run in runs):
            continue
        add(
            row.label,
            [format_value(run.mean(row.key), row.unit) for run in runs],
            [format_difference(candidate.differences.get(row.key)) for candidate in comparison.candidates],
        )
    text = _aligned(lines)
    text.append("")
    for candidate in comparison.candidates:
        text.append(_verdict_line(candidate, level))
    notes = comparison.notes + [note for candidate in comparison.candidates for note in candidate.notes]
    if notes:
        text.append("notes:")
        text.extend(f"  - {note}" for note in notes)
    return "\n".join(text)


def _aligned(lines: list[list[str]]) -> list[str]:
    """The rows as text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    ]


def format_value(value: float | None, unit: str) -> str:
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


def format_difference(difference: Difference | None) -> str:
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


def _verdict_line(candidate: Candidate, level: str) -> str:
    speed = candidate.differences.get(candidate.verdict_metric) if candidate.verdict_metric else None
    line = f"{candidate.run.label}: {candidate.verdict}"
    if speed is not None and candidate.verdict_metric:
        line += f" ({ROW_OF[candidate.verdict_metric].label} {format_difference(speed)})"
    gate = candidate.gate
    if gate.failed and gate.change is not None:
        bound = f"{gate.change.high:+.2f}%"
        line += f"; gate on {gate.metric}: FAIL, dropped more than {gate.max_drop:g}% ({level} interval ends at {bound})"
    elif gate.undecided:
        line += f"; gate on {gate.metric}: {gate.reason}"
    else:
        line += f"; gate on {gate.metric}: pass (max drop {gate.max_drop:g}%)"
    return line
