"""The run summary: a run's MFU windows and the setup they were measured on, in two small files.

``mfu-callbacks compare`` reads it to tell whether a change made training faster. It holds every
window the meter read (the optimizer step it was read at and the metrics dict ``MFUMeter.metrics()``
returned, keys as in :mod:`mfu_callbacks.metrics`), what MFU was measured on (GPU, peak, dtype,
world size, FLOPs per token and their split by component, the model), the library versions, and
a format version.

A read costs the same at step 10 and at step 100,000, so the windows are not rewritten at each
read: ``mfu_summary.json`` holds the setup, the versions and the status (small, rewritten atomically
only when they change), and ``mfu_windows.jsonl`` beside it holds one window per line, appended as
each is read. Neither file is synced to disk at a read; ``SummaryWriter.sync`` makes both durable
(at checkpoints and at the end of the run). A run killed mid-way leaves every window written before
it; a last line cut off mid-write is skipped by the reader.

    from mfu_callbacks.runs.summary import SummaryWriter, describe_setup

    writer = SummaryWriter("out")                         # out/mfu_summary.json + out/mfu_windows.jsonl
    for step, batch in enumerate(loader, start=1):
        meter.start_step(batch)
        ...
        meter.end_step()
        if step % 10 == 0:
            metrics = meter.metrics()                    # {"mfu": 0.41, "step_time": 0.21, ...}
            if step == 10:
                writer.write_header(describe_setup(
                    peak=meter.peak, world_size=world_size, flops=meter.run_flops(), model=model))
            writer.append(step, metrics)
    writer.sync()

``RunSummary.read("out")`` reads both back. The header (``FORMAT_VERSION`` 2)::

    {"format": "mfu-callbacks run summary", "format_version": 2,
     "setup": {"device": "NVIDIA H100 SXM", "peak_tflops": 989.4, "peak_source": "NVIDIA H100 ...",
               "dtype": "bf16", "world_size": 8,
               "parallelism": {"engine": "fsdp2", "data_parallel": 4, "fsdp_shard": 4,
                               "dp_replicate": 1, "tensor_parallel": 2,
                               "mesh": {"dp_shard": 4, "tp": 2}},
               "model_flops_per_token": 4.3e9,
               "flops_breakdown_per_token": {"linear": 4.0e9, "attention": 2.9e8},
               "model": {"architecture": "LlamaForCausalLM", "parameters": 6738415616,
                         "trainable_parameters": 4194304,
                         "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}},
     "versions": {"torch": "2.11.0", "transformers": "5.17.0", "mfu_callbacks": "0.1.0"},
     "windows_file": "mfu_windows.jsonl",
     "status": {"code": 1, "name": "measuring", "reason": "", "fix": ""},
     "totals": {"model_flops": 3.1e18, "hardware_flops": 3.4e18, "tokens": 7.2e8,
                "padded_tokens": 7.6e8, "wall_seconds": 512.0, "gpu_seconds": 4096.0,
                "steps": 1000, "peak_flops": 9.894e14}}

and each line of the windows file::

    {"step": 10, "metrics": {"mfu": 0.412, "tokens_per_sec_per_gpu": 9012.5, ...},
     "totals": {"model_flops": 3.1e16, "gpu_seconds": 40.9, ...}}

``status`` (optional) says whether MFU was measured when the header was last written, and if not,
why and what to do (codes in :mod:`mfu_callbacks.metrics`). ``totals`` (optional, written since
0.2.0) are the sums the run's figures divide, all ranks together: the header's are the run's as of
its last rewrite (each checkpoint and the end of the run), so its MFU is the end-of-run report's,
``model_flops / gpu_seconds / peak_flops``; a window's are what that window added. ``compare``
divides them; for files without them it falls back to window means weighted by each window's time. Every setup key is optional: a reader
shows what is there. Files of format version 1 (the windows inside ``mfu_summary.json``) are still
read. Only torch and the standard library are imported here.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from .._atomic import write_json, write_text
from .._input_files import InputFileError, load_json, parse_json, read_text

if TYPE_CHECKING:
    from ..flops import StepFlops
    from ..hardware import PeakInfo

FORMAT = "mfu-callbacks run summary"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: the windows inside the header document
DEFAULT_FILENAME = "mfu_summary.json"
WINDOWS_FILENAME = "mfu_windows.jsonl"
# Frameworks whose version is recorded when the training process has imported them.
_FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate", "peft", "trl")


class RunSummaryError(ValueError):
    """A document that is not a run summary this version can read; the message says what is wrong."""


def window_record(
    step: int, metrics: Mapping[str, float], totals: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """One window as stored: the optimizer step it was read at, its finite metrics and (when given)
    the totals it adds to the run."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    record: dict[str, Any] = {"step": step, "metrics": _finite(metrics)}
    if totals is not None:
        record["totals"] = _finite(totals)
    return record


def _finite(numbers: Mapping[str, float]) -> dict[str, float]:
    values: dict[str, float] = {}
    for key, value in numbers.items():
        number = float(value)  # a 0-d tensor works too; a string raises here, not in the reader
        if math.isfinite(number):
            values[str(key)] = number
    return values


def header_document(
    setup: Mapping[str, Any],
    versions: Mapping[str, str],
    status: Mapping[str, Any] | None,
    totals: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The ``mfu_summary.json`` document: everything but the windows, which live in the windows file."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "setup": _plain(setup),
        "versions": dict(versions),
        "windows_file": WINDOWS_FILENAME,
        **({"status": _plain(status)} if status is not None else {}),
        **({"totals": _finite(totals)} if totals is not None else {}),
    }


def summary_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(header, windows file) for ``path``: a ``.json`` file, or a folder that gets the default names."""
    target = Path(path)
    if target.suffix != ".json":
        target = target / DEFAULT_FILENAME
    return target, target.with_name(WINDOWS_FILENAME)


class RunSummary:
    """Per-window metrics of one run and the setup they were measured on, in memory (to read or write whole).

    setup: what the measurement ran on (see :func:`describe_setup` for the keys).
    versions: library versions; default: torch, this package and every imported training framework.

    A training run writes through :class:`SummaryWriter`, which never holds the windows; this class is
    what readers (``compare``, ``plot``) get from :meth:`read`.
    """

    def __init__(
        self, setup: Mapping[str, Any] | None = None, *, versions: Mapping[str, str] | None = None
    ) -> None:
        self.setup: dict[str, Any] = dict(setup or {})
        self.versions: dict[str, str] = dict(versions) if versions is not None else library_versions()
        self.windows: list[dict[str, Any]] = []
        self.status: dict[str, Any] | None = None  # {"code", "name", "reason", "fix"}, as in the docstring
        self.totals: dict[str, float] | None = None  # the run's totals when last written (see the docstring)

    def add_window(
        self, step: int, metrics: Mapping[str, float], totals: Mapping[str, float] | None = None
    ) -> None:
        """One window: the optimizer step it was read at, its metrics (non-finite values are left out)
        and the totals it added to the run, if known."""
        self.windows.append(window_record(step, metrics, totals))

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole summary to ``path`` (the header file, or a folder); return the header written.

        Both files are written atomically (``_atomic``): a reader sees the previous complete file or
        the new one, never half of one.
        """
        header, windows = summary_paths(path)
        lines = "".join(_json_line(window) for window in self.windows)
        write_text(windows, lines)
        return write_json(header, header_document(self.setup, self.versions, self.status, self.totals))

    @classmethod
    def from_dict(cls, document: Any, windows: list[Any] | None = None) -> RunSummary:
        """Rebuild a summary from its header document and its windows (format 1: inside the document);
        RunSummaryError says what does not fit."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise RunSummaryError(f'not an mfu-callbacks run summary (no "format": "{FORMAT}")')
        version = document.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise RunSummaryError(
                f"run summary format version {version!r}; this mfu-callbacks reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}"
            )
        setup, versions = document.get("setup", {}), document.get("versions", {})
        if version == 1:
            windows = document.get("windows")
        if not isinstance(setup, dict) or not isinstance(versions, dict) or not isinstance(windows, list):
            raise RunSummaryError(
                "run summary without a 'setup' object, a 'versions' object and a list of windows"
            )
        summary = cls(setup, versions=versions)
        status = document.get("status")
        summary.status = dict(status) if isinstance(status, dict) else None
        summary.totals = _totals_or_none(document.get("totals"))
        for index, window in enumerate(windows):
            try:
                summary.add_window(window["step"], window["metrics"], _totals_or_none(window.get("totals")))
            except (TypeError, KeyError, ValueError, AttributeError):
                raise RunSummaryError(
                    f'window {index} is not {{"step": int, "metrics": {{name: number}}}}: {str(window)[:80]}'
                ) from None
        return summary

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> RunSummary:
        """Read a summary (its header file, or a folder holding one); RunSummaryError names the file."""
        target = Path(path)
        if target.is_dir():
            target = target / DEFAULT_FILENAME
        document = _read_document(target)
        windows = None
        if (
            isinstance(document, dict)
            and document.get("format") == FORMAT
            and document.get("format_version") == 2
        ):
            name = document.get("windows_file", WINDOWS_FILENAME)
            windows = read_windows(target.with_name(Path(str(name)).name))  # beside it, never elsewhere
        try:
            return cls.from_dict(document, windows)
        except RunSummaryError as error:
            raise RunSummaryError(f"{target}: {error}") from None


class SummaryWriter:
    """Writes a run summary as the run goes: each window appended, the header rewritten when it changes.

    folder: where ``mfu_summary.json`` and ``mfu_windows.jsonl`` go (created if needed).
    resume_after: a resumed run continues the windows file, keeping the windows up to this optimizer
        step (those after it belong to steps the run is about to take again); None starts a new file.

    The cost of a window does not grow with the run: one line is written and flushed to the operating
    system, nothing is synced to disk. ``sync`` makes both files durable (checkpoints, end of run).
    """

    def __init__(self, folder: str | os.PathLike[str], *, resume_after: int | None = None) -> None:
        self.header_path, self.windows_path = summary_paths(folder)
        self.header_path.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if resume_after is not None and self.windows_path.exists():
            try:
                earlier = read_windows(self.windows_path)
            except RunSummaryError:
                earlier = []  # an unreadable file of an earlier run is replaced, not continued
            kept = "".join(_json_line(w) for w in earlier if w.get("step", math.inf) <= resume_after)
        write_text(self.windows_path, kept, durable=False)  # one rewrite per run, never per window
        self._windows: IO[str] | None = open(self.windows_path, "a", encoding="utf-8")  # noqa: SIM115
        self._header: str | None = None  # the header as last written
        self.bytes_written = 0  # by appends and header rewrites: what a read costs on disk
        if resume_after is None or not self.header_path.exists():
            self.write_header({})  # readable from the start; the setup comes with the first window

    def append(
        self, step: int, metrics: Mapping[str, float], totals: Mapping[str, float] | None = None
    ) -> None:
        """One window, as one line at the end of the windows file (``totals``: what it added to the run)."""
        if self._windows is None:
            raise ValueError("SummaryWriter.append() after close()")
        line = _json_line(window_record(step, metrics, totals))
        self._windows.write(line)
        self._windows.flush()
        self.bytes_written += len(line)

    def write_header(
        self,
        setup: Mapping[str, Any],
        status: Mapping[str, Any] | None = None,
        versions: Mapping[str, str] | None = None,
        totals: Mapping[str, float] | None = None,
    ) -> None:
        """Rewrite ``mfu_summary.json`` (atomically) if its content changed; otherwise do nothing."""
        versions = versions if versions is not None else library_versions()
        document = header_document(setup, versions, status, totals)
        text = json.dumps(document, indent=1, allow_nan=False)
        if text == self._header:
            return
        write_text(self.header_path, text + "\n", durable=False)
        self._header = text
        self.bytes_written += len(text)

    def sync(self) -> None:
        """Make what was written durable: the windows file and the header reach the disk."""
        if self._windows is not None:
            self._windows.flush()
            os.fsync(self._windows.fileno())
        if self._header is not None:
            with open(self.header_path, "rb") as header:
                os.fsync(header.fileno())

    def close(self) -> None:
        """Sync and close the windows file (a later ``append`` raises)."""
        if self._windows is not None:
            self.sync()
            self._windows.close()
            self._windows = None


def read_windows(path: Path) -> list[dict[str, Any]]:
    """The windows of a windows file, in file order; a last line cut off mid-write is skipped."""
    expected = f"a run summary is {DEFAULT_FILENAME} with {WINDOWS_FILENAME} beside it; copy both"
    try:
        text = read_text(path, expected) if path.stat().st_size else ""
    except OSError as error:
        raise RunSummaryError(f"cannot read the windows file {path} ({error}): {expected}") from None
    except InputFileError as error:
        raise RunSummaryError(str(error)) from None
    lines = text.split("\n")
    windows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            windows.append(parse_json(line, f"{path}, line {number}", "expected a JSON window"))
        except InputFileError as error:
            if number == len(lines):  # no newline after it: the write was cut off
                break
            raise RunSummaryError(str(error)) from None
    return windows


def _read_document(target: Path) -> Any:
    try:
        return load_json(target, "expected an mfu-callbacks run summary")
    except InputFileError as error:
        raise RunSummaryError(str(error)) from None


def _totals_or_none(value: Any) -> dict[str, float] | None:
    """Stored totals as numbers; None when absent (files written before they were stored) or malformed."""
    if not isinstance(value, dict):
        return None
    totals = {
        str(key): float(number)
        for key, number in value.items()
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
    }
    return totals if len(totals) == len(value) else None


def _json_line(window: Mapping[str, Any]) -> str:
    return json.dumps(window, separators=(",", ":"), allow_nan=False) + "\n"


def describe_setup(
    *,
    peak: PeakInfo | None = None,
    world_size: int | None = None,
    flops: StepFlops | None = None,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    parallelism: Mapping[str, Any] | None = None,
    matmul_dtypes: Mapping[str, tuple[float, PeakInfo | None]] | None = None,
    peak_per_dtype: bool = False,
) -> dict[str, Any]:
    """The setup keys of a run summary, from what the meter knows; a key is left out when unknown.

    peak: ``MFUMeter.peak`` (gives ``device``, ``peak_tflops``, ``peak_source``, ``dtype``).
    world_size: GPUs sharing the work.
    flops: ``MFUMeter.run_flops()``, the FLOPs of every step read so far (gives
        ``model_flops_per_token``, real tokens only, and ``flops_breakdown_per_token``).
    model: the trained model, any wrapper (gives ``model``: architecture, parameter counts, LoRA).
    device / dtype: for a run without a peak (an unknown GPU): the device name and the compute dtype.
    parallelism: ``MFUMeter.parallelism.as_config()``: the data-parallel size and the model-parallel
        degrees (``tensor_parallel``, ``fsdp_shard``, ``dp_replicate``), the engine and the mesh.
    matmul_dtypes: ``MFUMeter.matmul_dtypes()`` (gives ``matmul_dtypes``: per dtype the matmuls ran in,
        its share of the model FLOPs and the peak TFLOP/s it is judged against); ``peak_per_dtype``:
        whether each dtype is judged against its own peak (``MFUMeter.dtype_peaks()``), else all
        against ``peak_tflops`` (gives ``peak_rule``: "per dtype" or "one peak").
    """
    setup: dict[str, Any] = {}
    if device is not None:
        setup["device"] = device
    if dtype is not None:
        setup["dtype"] = dtype
    if peak is not None:
        setup.update(
            device=peak.device_name, peak_tflops=peak.tflops, peak_source=peak.source, dtype=peak.dtype
        )
    if world_size is not None:
        setup["world_size"] = int(world_size)
    if parallelism is not None:
        setup["parallelism"] = dict(parallelism)
    if flops is not None and flops.tokens > 0:
        setup["model_flops_per_token"] = flops.model_flops / flops.tokens
        setup["flops_breakdown_per_token"] = {
            name: value / flops.tokens for name, value in sorted(flops.breakdown.items()) if value
        }
    if matmul_dtypes:
        setup["matmul_dtypes"] = {
            dtype: {"model_flops_share": share, "peak_tflops": peak.tflops if peak is not None else None}
            for dtype, (share, peak) in matmul_dtypes.items()
        }
        setup["peak_rule"] = "per dtype" if peak_per_dtype else "one peak"
    if model is not None:
        setup["model"] = model_fingerprint(model)
    return setup


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture class name, total and trainable parameter counts, and the LoRA config if any.

    Wrappers (DDP, FSDP1, torch.compile, Lightning) are looked through; a PEFT model is named by
    its base model's class. Parameters are counted as this process holds them (FSDP2's DTensors
    count whole; FSDP1 without ``use_orig_params`` counts its flat shards).
    """
    from ..flops.unwrap import unwrap_model

    inner = unwrap_model(model)
    get_base_model = getattr(inner, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else inner
    fingerprint: dict[str, Any] = {
        "architecture": type(base).__name__,
        "parameters": sum(parameter.numel() for parameter in inner.parameters()),
        "trainable_parameters": sum(
            parameter.numel() for parameter in inner.parameters() if parameter.requires_grad
        ),
    }
    lora = _lora_config(inner)
    if lora is not None:
        fingerprint["lora"] = lora
    return fingerprint


def _lora_config(model: nn.Module) -> dict[str, Any] | None:
    """r, alpha and target modules of a PEFT model's active adapter (its ``peft_config``)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    name = active if isinstance(active, str) and active in configs else next(iter(configs))
    config = configs[name]
    if getattr(config, "r", None) is None:
        return None  # a PEFT method without a rank (prompt tuning, IA3, ...)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets = sorted(str(target) for target in targets)
    return {
        "r": config.r,
        "alpha": getattr(config, "lora_alpha", None),
        "target_modules": targets,
        "adapter": name,
    }


def library_versions() -> dict[str, str]:
    """torch's version, this package's, and those of the training frameworks this process imported."""
    import torch

    from .. import __version__

    versions = {"torch": str(torch.__version__), "mfu_callbacks": __version__}
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if version is not None:
            versions[name] = str(version)
    return versions


def _plain(value: Any) -> Any:
    """Setup values as JSON: numbers, strings, lists, dicts; non-finite floats become null."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return _plain(value.item())
    return str(value)
