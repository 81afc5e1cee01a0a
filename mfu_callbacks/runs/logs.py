"""Read a run's MFU windows, loss curve and setup back from what a training run left on disk.

Four formats: the run summary (``mfu_summary.json``, see :mod:`mfu_callbacks.runs.summary`), a W&B
offline run (read with W&B's own reader, ``wandb leet inspect --json``), a Lightning ``CSVLogger``
``metrics.csv``, and a Hugging Face Trainer ``trainer_state.json``. A folder is searched for them.

Metric keys are read without their prefix: ``train/mfu``, ``mfu`` and ``perf/mfu`` are all ``mfu``
(``train/`` first when a row has several).
"""

from __future__ import annotations

import csv
import difflib
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._input_files import InputFileError, check_size, load_json, parse_json
from ..metrics import MFU, NUMERIC_METRICS
from .summary import DEFAULT_FILENAME, RunSummary, RunSummaryError
from .wandb import CONFIG_KEY

_LOSS_KEYS = ("train/loss", "loss")
_STEP_KEYS = ("train/global_step", "trainer/global_step", "step", "_step")
_LIGHTNING_STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger: the 0-based index of the step
# A logged number beyond this is no measurement (and its square would overflow a float): left out like NaN.
_LARGEST_VALUE = 1e100
EXPECTED = (
    "an mfu-callbacks run summary (mfu_summary.json), a W&B run (run-*.wandb), a Lightning metrics.csv "
    "or a Trainer trainer_state.json"
)

# What a folder is searched for, in order of preference, per purpose.
_EXPECTED_BY_SUFFIX = {
    ".wandb": "expected the run-*.wandb log of a W&B run that has logged at least once",
    ".csv": "expected a Lightning CSVLogger metrics.csv (a header row with step and train/mfu, then one row per log)",
    ".json": "expected a Trainer trainer_state.json (saved in each checkpoint-N folder) or an mfu-callbacks "
    "run summary (mfu_summary.json)",
}
SUMMARY_FIRST = (DEFAULT_FILENAME, "run-*.wandb", "metrics.csv", "trainer_state.json")
LOSS_FIRST = ("run-*.wandb", "metrics.csv", "trainer_state.json", DEFAULT_FILENAME)


class RunLogError(Exception):
    """The path is not a run this module can read: the message names the file and what was looked for."""


@dataclass
class RunLog:
    """What one run left: its metrics windows (unprefixed keys), loss points, setup and versions."""

    source: str
    kind: str  # "run summary", "W&B run", "Lightning metrics.csv" or "Trainer state"
    windows: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    loss: list[tuple[float, float]] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a reader should know about how it was found
    # Run summaries since 0.2.0: what each window added to the run's totals (by the window's step), and
    # the run's totals as its report divided them (see ``mfu_callbacks.runs.summary``).
    window_totals: dict[float, dict[str, float]] = field(default_factory=dict)
    run_totals: dict[str, float] | None = None

    def add(self, row: dict) -> None:
        """A logged row: a window if it holds any MFU metric, a loss point if it holds the loss.

        Steps are global optimizer steps counted from 1, as HF Trainer and the run summary count them:
        Lightning logs the 0-based index of the step (``step`` in ``metrics.csv``, ``trainer/global_step``
        in W&B), one less, so its steps are read plus one."""
        key = next((key for key in _STEP_KEYS if _is_number(row.get(key))), None)
        if key is None:
            return
        zero_based = key == _LIGHTNING_STEP_KEY or (key == "step" and self.kind == "Lightning metrics.csv")
        step = float(row[key]) + (1.0 if zero_based else 0.0)
        metrics = metric_values(row)
        if metrics:
            self.windows.append((step, metrics))
        loss = next((float(row[key]) for key in _LOSS_KEYS if _is_number(row.get(key))), None)
        if loss is not None:
            self.loss.append((step, loss))


@dataclass
class Curves:
    """(step, value) points of MFU and loss, in step order, and what they were read from."""

    source: str
    mfu: list[tuple[float, float]] = field(default_factory=list)
    loss: list[tuple[float, float]] = field(default_factory=list)


def metric_values(row: dict) -> dict[str, float]:
    """The numeric MFU metrics of a logged row, keys without prefix."""
    values: dict[str, float] = {}
    suffixes: dict[str, str] = {}
    for key in sorted(row):
        name = key.rsplit("/", 1)[-1]
        if name in NUMERIC_METRICS and name not in suffixes and _is_number(row[key]):
            suffixes[name] = key
    for name in NUMERIC_METRICS:
        key = next(
            (key for key in (f"train/{name}", name, suffixes.get(name)) if key and _is_number(row.get(key))),
            None,
        )
        if key is not None:
            values[name] = float(row[key])
    return values


def _is_number(value: object) -> bool:
    """A finite number, or a string of one (CSV cells)."""
    if isinstance(value, bool) or value is None or value == "":
        return False
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(number) and abs(number) <= _LARGEST_VALUE


def _natural_key(path: Path) -> list:
    """checkpoint-500 before checkpoint-1000, version_9 before version_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_log(path: str | Path, order: tuple[str, ...] = SUMMARY_FIRST) -> tuple[Path, int]:
    """The file to read for ``path`` and how many files of its kind were there to choose from: ``path``
    itself, or in a folder the latest (by name, numbers compared as numbers) of the first kind in ``order``."""
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"no such file or folder: {path}{_nearby(path)} (expected {EXPECTED})")
    if not path.is_dir():
        return path, 1
    for pattern in order:
        candidates = sorted(path.rglob(pattern), key=_natural_key)
        if candidates:
            return candidates[-1], len(candidates)
    raise RunLogError(f"{path} holds none of: {EXPECTED}")


def read_run(path: str | Path, order: tuple[str, ...] = SUMMARY_FIRST) -> RunLog:
    """The run at ``path`` (a file of one of the four formats, or a folder holding one), windows in step order.

    A run without a single MFU window is returned as read: the caller says what it needed.
    """
    reference = wandb_reference(str(path))
    if reference is not None:
        return read_online_wandb_run(reference)
    folder = Path(path)
    path, choices = find_log(path, order)
    expected = _EXPECTED_BY_SUFFIX.get(path.suffix, "expected " + EXPECTED)
    try:
        if check_size(path, expected) == 0:
            raise RunLogError(f"{path} is empty: {expected}")
        if path.suffix == ".wandb":
            run = _read_wandb(path)
        elif path.suffix == ".csv":
            run = _read_csv(path)
        elif path.suffix == ".json":
            run = _read_json(path)
        else:
            raise RunLogError(f"cannot read {path}: expected {EXPECTED}")
    except InputFileError as error:
        raise RunLogError(str(error)) from None
    _check_setup(run)
    run.windows.sort(key=lambda window: window[0])
    run.loss.sort()
    if choices > 1:
        run.notes.append(f"{folder} holds {choices} files like {path.name}: read the last by name, {path}")
    return run


def read_curves(path: str | Path) -> Curves:
    """The curves of the run at ``path`` (a W&B run folder or .wandb file, metrics.csv, trainer_state.json,
    mfu_summary.json); a folder's loss-bearing logs are preferred."""
    run = read_run(path, LOSS_FIRST)
    curves = Curves(source=run.source, loss=run.loss)
    curves.mfu = [(step, metrics[MFU]) for step, metrics in run.windows if MFU in metrics]
    if not curves.mfu:
        raise RunLogError(
            f"no MFU in {run.source}: was the MFU callback in the run, and did it log (after warm-up)?"
        )
    return curves


def wandb_records(path: Path) -> list[dict]:
    """The records of a W&B run log (``run-*.wandb``), as W&B's own reader prints them."""
    executable = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    try:
        result = subprocess.run(
            [executable, "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    except OSError as error:
        raise RunLogError(f"reading a W&B run needs the wandb command (pip install wandb): {error}") from None
    said = " ".join(result.stderr.split())[-300:]
    if result.returncode != 0:
        raise RunLogError(
            f"wandb could not read {path} ({said or f'exit code {result.returncode}'}): expected a "
            "W&B run log, run-*.wandb"
        )
    expected = _EXPECTED_BY_SUFFIX[".wandb"]
    try:
        records = [
            parse_json(line, f"{path} (as wandb prints it)", expected, allow_nan=True)
            for line in result.stdout.splitlines()
            if line.startswith("{")
        ]
    except InputFileError as error:
        raise RunLogError(f"{error}; or wandb printed it in a form this version cannot read") from None
    records = [record for record in records if isinstance(record, dict)]
    if not records:
        raise RunLogError(
            f"{path} holds no W&B records{f' ({said})' if said else ''}: {_EXPECTED_BY_SUFFIX['.wandb']}"
        )
    return records


_ONLINE_RUN = re.compile(r"[\w.-]+/[\w.-]+/[\w-]+")  # entity/project/run_id, as the W&B API names a run
_WANDB_PREFIX = "wandb:"
_WANDB_URL = re.compile(r"https?://(?:[\w-]+\.)*wandb\.ai/([\w.-]+)/([\w.-]+)/runs/([\w-]+)(?:[/?#].*)?")
ONLINE_FORMS = (
    "entity/project/run_id, wandb:entity/project/run_id or https://wandb.ai/entity/project/runs/run_id"
)


def wandb_reference(text: str) -> str | None:
    """``entity/project/run_id`` when ``text`` names a run on a W&B server, else None (a local path).

    ``wandb:entity/project/run_id`` and a wandb.ai run URL always do; a bare ``a/b/c`` only when nothing
    of it exists here, not even its first folder: ``out/run1/checkpoint-500`` beside an ``out`` folder is
    a local path that is missing, not a W&B run.
    """
    if text.startswith(_WANDB_PREFIX):
        return text[len(_WANDB_PREFIX) :]
    url = _WANDB_URL.fullmatch(text)
    if url:
        return "/".join(url.groups())
    if not _ONLINE_RUN.fullmatch(text) or Path(text.split("/", 1)[0]).exists():
        return None
    return text


def _nearby(path: Path) -> str:
    """Names close to a missing ``path``'s in the deepest folder above it that exists (a mistyped
    ``checkpoint-500``): its closest names, or the last few when its own folder exists."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    try:
        names = sorted((entry.name for entry in parent.iterdir()), key=_natural_key_of_name)
        wanted = path.absolute().relative_to(parent.absolute()).parts[0]
    except (OSError, ValueError, IndexError):
        return ""
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.6)
    if close:
        return f"; {parent} holds {', '.join(close)}"
    if parent == path.parent and names:
        return f"; {parent} holds {', '.join(names[-5:])}"
    return ""


def _natural_key_of_name(name: str) -> list:
    return _natural_key(Path(name))


def read_online_wandb_run(path: str, api: Any = None) -> RunLog:
    """A run on a W&B server, by ``entity/project/run_id`` (needs the network and a W&B login).

    The same rows and config as an offline run: its history (every logged row) and the setup the
    callbacks wrote into the run's config under ``mfu_callbacks``.
    """
    if api is None:
        try:
            import wandb
        except ImportError:
            raise RunLogError(
                f"no local file or folder {path}, and reading it as the W&B run entity/project/run_id needs "
                "wandb: pip install wandb"
            ) from None
    try:
        if api is None:
            api = wandb.Api()  # a missing login fails here
        online = api.run(path)
        rows = list(online.scan_history())
        config = dict(online.config)
    except Exception as error:  # noqa: BLE001 - network, login, a run that does not exist: one line
        raise RunLogError(
            f"cannot read {path} as a W&B run ({' '.join(str(error).split())[:300]}): no local file or "
            f"folder has this name, so it was read as entity/project/run_id, which needs a run you can read, "
            f"the network and a W&B login; for a local run, check the path"
        ) from None
    run = RunLog(source=path, kind="W&B run")
    for row in rows:
        if isinstance(row, dict):
            run.add(row)
    described = config.get(CONFIG_KEY)
    if isinstance(described, dict):
        run.setup.update(described)
    _check_setup(run)
    run.windows.sort(key=lambda window: window[0])
    run.loss.sort()
    return run


def _read_wandb(path: Path) -> RunLog:
    run = RunLog(source=str(path), kind="W&B run")
    for record in wandb_records(path):
        kind = record.get("type")
        body = record.get(kind) if isinstance(kind, str) else None
        if not isinstance(body, dict):
            continue
        if kind == "history" and isinstance(body.get("item"), dict):
            run.add(body["item"])
        elif kind in ("config", "run"):
            config = body.get("config", {}) if kind == "run" else body
            update = config.get("update", {}) if isinstance(config, dict) else None
            described = update.get(CONFIG_KEY) if isinstance(update, dict) else None
            if isinstance(described, dict):
                run.setup.update(described)
    return run


def _read_csv(path: Path) -> RunLog:
    expected = _EXPECTED_BY_SUFFIX[".csv"]
    run = RunLog(source=str(path), kind="Lightning metrics.csv")
    check_size(path, expected)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise RunLogError(f"{path} is empty: {expected}")
            if not any(key in reader.fieldnames for key in _STEP_KEYS):
                raise RunLogError(
                    f"{path} has no step column (its columns: {', '.join(reader.fieldnames)[:200]}): "
                    f"{expected}"
                )
            for row in reader:
                run.add(row)
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise RunLogError(f"cannot read {path} as CSV ({error}): {expected}") from None
    return run


def _read_json(path: Path) -> RunLog:
    """A run summary or a Trainer state, told apart by their content."""
    expected = _EXPECTED_BY_SUFFIX[".json"]
    document = load_json(path, expected, allow_nan=True)  # a Trainer state logs a NaN loss as NaN
    if isinstance(document, dict) and "format" in document:
        try:
            summary = RunSummary.read(path)  # its windows file too
        except RunSummaryError as error:
            raise RunLogError(str(error)) from None
        run = RunLog(source=str(path), kind="run summary", setup=summary.setup, versions=summary.versions)
        run.windows = [
            (
                float(window["step"]),
                {key: value for key, value in window["metrics"].items() if _is_number(value)},
            )
            for window in summary.windows
        ]
        run.window_totals = {float(w["step"]): w["totals"] for w in summary.windows if "totals" in w}
        run.run_totals = summary.totals
        return run
    if not isinstance(document, dict) or not isinstance(document.get("log_history"), list):
        raise RunLogError(f"{path} has no 'log_history' (nor a run summary's 'format'): {expected}")
    run = RunLog(source=str(path), kind="Trainer state")
    for row in document["log_history"]:
        if isinstance(row, dict):
            run.add(row)
    return run


# Setup values a reader computes with, and what each must be.
_SETUP_NUMBERS = {
    "peak_tflops": "a number of TFLOP/s",
    "world_size": "a whole number of GPUs",
    "model_flops_per_token": "a number of FLOPs",
}


def _check_setup(run: RunLog) -> None:
    """The setup's numbers are numbers (a peak written as text, a NaN or an overflowing value is named),
    so that what is read can be compared and printed as JSON."""
    for key, meaning in _SETUP_NUMBERS.items():
        value = run.setup.get(key)
        if value is None:
            continue
        whole = key == "world_size"
        if not (_is_number(value) and not isinstance(value, str)) or (whole and not isinstance(value, int)):
            raise RunLogError(
                f"{run.source}: setup {key} is {str(value)[:40]!r} ({type(value).__name__}): expected "
                f"{meaning}; correct the file or read the run again from its training output"
            )
    stack: list[tuple[str, Any]] = [("setup", run.setup)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise RunLogError(
                f"{run.source}: {where} is {value}, which is not a number JSON allows: correct the file or "
                "read the run again from its training output"
            )
