"""The run summary: a run's MFU windows and the setup they were measured on, in one small JSON file.

``mfu-callbacks compare`` reads it to tell whether a change made training faster. It holds every
window the meter read (the optimizer step it was read at and the metrics dict ``MFUMeter.metrics()``
returned, keys as in :mod:`mfu_callbacks.metrics`), what MFU was measured on (GPU, peak, dtype,
world size, FLOPs per token and their split by component, the model), the library versions, and
a format version. The file is rewritten atomically on every ``write``: a run killed mid-way
leaves the windows of its last write, readable.

    from mfu_callbacks.run_summary import RunSummary, describe_setup

    summary = RunSummary()
    for step, batch in enumerate(loader, start=1):
        meter.start_step(batch)
        ...
        meter.end_step()
        if step % 10 == 0:
            metrics = meter.metrics()                    # {"mfu": 0.41, "step_time": 0.21, ...}
            summary.setup.update(describe_setup(
                peak=meter.peak, world_size=world_size, flops=meter.run_flops(), model=model))
            summary.add_window(step, metrics)
            summary.write("out")                          # out/mfu_summary.json

The document (``FORMAT_VERSION`` 1)::

    {"format": "mfu-callbacks run summary", "format_version": 1,
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
     "windows": [{"step": 10, "metrics": {"mfu": 0.412, "tokens_per_sec_per_gpu": 9012.5, ...}}, ...],
     "status": {"code": 1, "name": "measuring", "reason": "", "fix": ""}}

``status`` (optional) says whether MFU was measured when the file was last written, and if not, why
and what to do (codes in :mod:`mfu_callbacks.metrics`). Every setup key is optional: a reader shows
what is there. Only torch and the standard library are imported here.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._atomic import write_json

if TYPE_CHECKING:
    from .flops import StepFlops
    from .hardware import PeakInfo

FORMAT = "mfu-callbacks run summary"
FORMAT_VERSION = 1
DEFAULT_FILENAME = "mfu_summary.json"
# Frameworks whose version is recorded when the training process has imported them.
_FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate", "peft", "trl")


class RunSummaryError(ValueError):
    """A document that is not a run summary this version can read; the message says what is wrong."""


class RunSummary:
    """Per-window metrics of one run and the setup they were measured on; written atomically as JSON.

    setup: what the measurement ran on (see :func:`describe_setup` for the keys); ``self.setup`` is
        a plain dict that may be updated later, when the FLOP engine has seen its first batch.
    versions: library versions; default: torch, this package and every imported training framework.

    Call ``add_window`` once per metrics read and ``write`` after it (on rank 0 only when distributed:
    the metrics are already combined over the ranks).
    """

    def __init__(
        self, setup: Mapping[str, Any] | None = None, *, versions: Mapping[str, str] | None = None
    ) -> None:
        self.setup: dict[str, Any] = dict(setup or {})
        self.versions: dict[str, str] = dict(versions) if versions is not None else library_versions()
        self.windows: list[dict[str, Any]] = []
        self.status: dict[str, Any] | None = None  # {"code", "name", "reason", "fix"}, as in the docstring

    def add_window(self, step: int, metrics: Mapping[str, float]) -> None:
        """One window: the optimizer step it was read at and its metrics (non-finite values are left out)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        values: dict[str, float] = {}
        for key, value in metrics.items():
            number = float(value)  # a 0-d tensor works too; a string raises here, not in the reader
            if math.isfinite(number):
                values[str(key)] = number
        self.windows.append({"step": step, "metrics": values})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "setup": _plain(self.setup),
            "versions": dict(self.versions),
            "windows": list(self.windows),
            **({"status": _plain(self.status)} if self.status is not None else {}),
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the summary to ``path``; return the file written.

        A path ending in ``.json`` is the file; any other path is a folder (created if needed) that
        gets ``mfu_summary.json``.

        Written atomically (``_atomic.write_json``): a reader sees the previous complete file or the
        new one, never half of one.
        """
        target = Path(path)
        if target.suffix != ".json":
            target = target / DEFAULT_FILENAME
        return write_json(target, self.to_dict())

    @classmethod
    def from_dict(cls, document: Any) -> RunSummary:
        """Rebuild a summary from its JSON document; RunSummaryError says what does not fit."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise RunSummaryError(f'not an mfu-callbacks run summary (no "format": "{FORMAT}")')
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise RunSummaryError(
                f"run summary format version {version!r}; this mfu-callbacks reads version {FORMAT_VERSION}"
            )
        setup, versions, windows = (
            document.get("setup", {}),
            document.get("versions", {}),
            document.get("windows"),
        )
        if not isinstance(setup, dict) or not isinstance(versions, dict) or not isinstance(windows, list):
            raise RunSummaryError(
                "run summary without a 'setup' object, a 'versions' object and a 'windows' list"
            )
        summary = cls(setup, versions=versions)
        status = document.get("status")
        summary.status = dict(status) if isinstance(status, dict) else None
        for index, window in enumerate(windows):
            try:
                summary.add_window(window["step"], window["metrics"])
            except (TypeError, KeyError, ValueError, AttributeError):
                raise RunSummaryError(
                    f'window {index} is not {{"step": int, "metrics": {{name: number}}}}: {str(window)[:80]}'
                ) from None
        return summary

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> RunSummary:
        """Read a summary file (or the ``mfu_summary.json`` of a folder); RunSummaryError names the file."""
        target = Path(path)
        if target.is_dir():
            target = target / DEFAULT_FILENAME
        try:
            text = target.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise RunSummaryError(f"cannot read {target}: {error}") from None
        if not text.strip():
            raise RunSummaryError(f"{target} is empty: expected an mfu-callbacks run summary")
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise RunSummaryError(
                f"{target} is not complete JSON ({error}): expected an mfu-callbacks run summary"
            ) from None
        try:
            return cls.from_dict(document)
        except RunSummaryError as error:
            raise RunSummaryError(f"{target}: {error}") from None


def describe_setup(
    *,
    peak: PeakInfo | None = None,
    world_size: int | None = None,
    flops: StepFlops | None = None,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    parallelism: Mapping[str, Any] | None = None,
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
    if model is not None:
        setup["model"] = model_fingerprint(model)
    return setup


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture class name, total and trainable parameter counts, and the LoRA config if any.

    Wrappers (DDP, FSDP1, torch.compile, Lightning) are looked through; a PEFT model is named by
    its base model's class. Parameters are counted as this process holds them (FSDP2's DTensors
    count whole; FSDP1 without ``use_orig_params`` counts its flat shards).
    """
    from .flops.unwrap import unwrap_model

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

    from . import __version__

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
