"""Read the MFU and loss curves back from what a training run left on disk.

Three formats: a W&B offline run (read with W&B's own reader, ``wandb leet inspect --json``), a
Lightning ``CSVLogger`` ``metrics.csv``, and a Hugging Face Trainer ``trainer_state.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_MFU_KEYS = ("train/mfu", "mfu")
_LOSS_KEYS = ("train/loss", "loss")
_STEP_KEYS = ("train/global_step", "trainer/global_step", "step", "_step")


class RunLogError(Exception):
    """The path is not a run this module can read: the message names what was looked for."""


@dataclass
class Curves:
    """(step, value) points of MFU and loss, in step order, and what they were read from."""

    source: str
    mfu: list[tuple[float, float]] = field(default_factory=list)
    loss: list[tuple[float, float]] = field(default_factory=list)

    def add(self, row: dict) -> None:
        step = next((float(row[key]) for key in _STEP_KEYS if _is_number(row.get(key))), None)
        if step is None:
            return
        for keys, points in ((_MFU_KEYS, self.mfu), (_LOSS_KEYS, self.loss)):
            value = next((float(row[key]) for key in keys if _is_number(row.get(key))), None)
            if value is not None:
                points.append((step, value))


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or value is None or value == "":
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def read_curves(path: str | Path) -> Curves:
    """The curves of the run at ``path`` (a W&B run folder or .wandb file, metrics.csv, trainer_state.json)."""
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"no such file or folder: {path} (expected {_FORMATS})")
    if path.is_dir():
        candidates = sorted(path.rglob("run-*.wandb")) or sorted(path.rglob("metrics.csv")) or sorted(
            path.rglob("trainer_state.json")
        )
        if not candidates:
            raise RunLogError(
                f"{path} holds no W&B run (run-*.wandb), Lightning metrics.csv or Trainer trainer_state.json"
            )
        path = candidates[-1]
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise RunLogError(f"cannot read {path}: expected {_FORMATS}")
    curves = reader(path)
    if not curves.mfu:
        raise RunLogError(f"no MFU in {path}: was the MFU callback in the run, and did it log (after warm-up)?")
    curves.mfu.sort()
    curves.loss.sort()
    return curves


def wandb_records(path: Path) -> list[dict]:
    """The records of a W&B run log (``run-*.wandb``), as W&B's own reader prints them."""
    return _wandb_log(path)[0]


def _wandb_log(path: Path) -> tuple[list[dict], str]:
    """The records of a W&B run log, and what W&B's reader said about the file (its last words)."""
    executable = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    try:
        result = subprocess.run([executable, "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                                timeout=300, stdin=subprocess.DEVNULL)
    except OSError as error:
        raise RunLogError(f"reading a W&B run needs the wandb command (pip install wandb): {error}") from None
    said = " ".join(result.stderr.split())[-300:]
    if result.returncode != 0:
        raise RunLogError(f"wandb could not read {path} ({said or f'exit code {result.returncode}'}): expected a "
                          "W&B run log, run-*.wandb")
    try:
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    except json.JSONDecodeError as error:
        raise RunLogError(f"wandb printed {path} in a form this version cannot read ({error}): "
                          "try another version of wandb") from None
    return records, said


def _read_wandb(path: Path) -> Curves:
    records, said = _wandb_log(path)
    if not records:
        raise RunLogError(f"{path} holds no W&B records{f' ({said})' if said else ''}: expected the run-*.wandb "
                          "log of a run that has logged at least once")
    curves = Curves(source=str(path))
    for record in records:
        if record.get("type") == "history":
            curves.add(record["history"]["item"])
    return curves


def _read_csv(path: Path) -> Curves:
    expected = "expected a Lightning CSVLogger metrics.csv (a header row with step and train/mfu, then one row per log)"
    curves = Curves(source=str(path))
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise RunLogError(f"{path} is empty: {expected}")
            if not any(key in reader.fieldnames for key in _STEP_KEYS):
                raise RunLogError(f"{path} has no step column (its columns: {', '.join(reader.fieldnames)[:200]}): "
                                  f"{expected}")
            for row in reader:
                curves.add(row)
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise RunLogError(f"cannot read {path} as CSV ({error}): {expected}") from None
    return curves


def _read_trainer_state(path: Path) -> Curves:
    expected = "expected a Trainer trainer_state.json (saved in each checkpoint-N folder)"
    try:
        text = path.read_text(encoding="utf-8")
        state = json.loads(text)
    except (OSError, UnicodeDecodeError) as error:
        raise RunLogError(f"cannot read {path} as JSON ({error}): {expected}") from None
    except json.JSONDecodeError as error:
        if not text.strip():
            raise RunLogError(f"{path} is empty: {expected}") from None
        if error.pos >= len(text.rstrip()):
            raise RunLogError(f"{path} is cut off: its JSON ends early (line {error.lineno}), as when a file is "
                              f"read while being written; {expected}") from None
        raise RunLogError(f"cannot read {path} as JSON ({error}): {expected}") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise RunLogError(f"{path} has no 'log_history': {expected}")
    curves = Curves(source=str(path))
    for row in state["log_history"]:
        if isinstance(row, dict):
            curves.add(row)
    return curves


_READERS = {".wandb": _read_wandb, ".csv": _read_csv, ".json": _read_trainer_state}
_FORMATS = "a W&B run folder or run-*.wandb file, a Lightning metrics.csv or a Trainer trainer_state.json"
