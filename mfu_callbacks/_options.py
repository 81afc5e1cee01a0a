"""The options every integration and the meter take: declared, documented and checked here alone.

``MFUOptions`` is the one list. The meter's and the callbacks' keyword arguments are typed by
``MeterKeywords`` and ``OptionKeywords`` (names and types only, for IDEs; a test keeps them equal to the
fields), a checkpoint holds ``to_json()`` and a resumed run reads it back with ``from_json()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypedDict

import torch

from . import _validate
from .diagnostics import validate_ids

# Options that hold functions: a checkpoint (JSON) cannot hold them.
FUNCTION_OPTIONS = ("token_counter", "forward")


@dataclass(frozen=True)
class MFUOptions:
    """What a user can set on any of the callbacks (and on ``MFUMeter``), checked when it is built: a bad
    value raises ValueError naming it, before training starts.

    peak_tflops: dense peak TFLOP/s per GPU, for hardware the table does not know (or to override it);
        ``$MFU_PEAK_TFLOPS`` does the same for every run of the process.
    dtype: one precision to judge every matmul's FLOPs against ("bf16", "fp16", "tf32", "fp32", "fp8", a
        torch dtype or a Lightning precision string such as "bf16-mixed"; torchtitan's convention is
        ``dtype="bf16"``, whatever the matmul dtype); omitted, each matmul is judged against the peak of
        the dtype it runs in (fp8, else the framework's precision, autocast's or the weights').
    warmup_steps: optimizer steps left out of the averages (compilation, allocator warm-up).
    log_interval: log every N optimizer steps; None follows the framework's own logging cadence.
    prefix: prepended to every metric name (``train/`` puts MFU beside ``train/loss``).
    token_counter: fn(batch) -> dict with "input_ids" (and "attention_mask"), for unusual batches.
    forward: fn(model, batch) for models that do not take the batch as keyword arguments.
    report: print the end-of-run report (rank 0) when training ends.
    silence_diagnostics: ids of diagnoses never to report (see ``mfu_callbacks.diagnostics``).
    summary_dir: the folder of the run summary, ``mfu_summary.json`` (read by ``mfu-callbacks compare``);
        default: the framework's output folder (HF ``output_dir``, Lightning ``log_dir``, Accelerate
        ``project_dir``).
    real_step: "check" (default) counts a meta-device copy of the model and checks it against the first
        measured step as it really runs, whose count is used where the copy cannot be traced or
        disagrees (custom autograd backward, data-dependent routing); "only" counts the real step
        alone; "off" never watches the real step.
    profile_steps: profile this many optimizer steps (at most 100) with ``torch.profiler`` (0, the
        default: never) and report where their time went, by bucket (matmuls by component, attention,
        elementwise, optimizer, communication, idle GPU), with the changes that would raise MFU most: in
        the end-of-run report, in W&B and in ``mfu_profile.json`` beside the run summary
        (``MFUMeter.step_breakdown()``). The profiled steps are left out of the MFU averages.
    profile_start: the optimizer step (0-based) the profile starts at; default: the first after warm-up
        (later if the FLOP engine is not ready by then).
    """

    peak_tflops: float | None = None
    dtype: str | torch.dtype | None = None
    warmup_steps: int = 2
    log_interval: int | None = None
    prefix: str = "train/"
    token_counter: Callable[[Any], Mapping[str, torch.Tensor]] | None = None
    forward: Callable[[torch.nn.Module, Any], Any] | None = None
    report: bool = True
    silence_diagnostics: tuple[str, ...] = ()
    summary_dir: str | None = None
    real_step: str = "check"
    profile_steps: int = 0
    profile_start: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_tflops", _validate.peak_tflops(self.peak_tflops))
        _validate.env_peak_tflops()
        _validate.compute_dtype(self.dtype)
        _validate.whole_number(self.warmup_steps, name="warmup_steps", minimum=0)
        _validate.optional_whole_number(self.log_interval, name="log_interval", minimum=1)
        if not isinstance(self.prefix, str):
            raise ValueError(f"prefix must be a string such as 'train/', got {self.prefix!r}")
        object.__setattr__(self, "silence_diagnostics", validate_ids(self.silence_diagnostics))
        for name in FUNCTION_OPTIONS:
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be a function, got {type(value).__name__}")
        if self.summary_dir is not None and not isinstance(self.summary_dir, (str, os.PathLike)):
            raise ValueError(f"summary_dir must be a folder path or None, got {self.summary_dir!r}")
        _validate.real_step(self.real_step)
        _validate.profile_steps(self.profile_steps)
        _validate.optional_whole_number(self.profile_start, name="profile_start", minimum=0)
        if not isinstance(self.report, bool):
            raise ValueError(f"report must be True or False, got {self.report!r}")

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every option's name."""
        return frozenset(field.name for field in fields(cls))

    def to_json(self) -> dict[str, Any]:
        """Every option but the functions, as JSON values (a torch dtype by its name, such as
        "bfloat16"; a folder as a string): what a checkpoint holds."""
        return {
            field.name: _json_value(getattr(self, field.name))
            for field in fields(self)
            if field.name not in FUNCTION_OPTIONS
        }

    @classmethod
    def from_json(cls, values: Mapping[str, Any], **functions: Any) -> MFUOptions:
        """The options ``to_json()`` wrote (with the functions it could not hold, if given again); names
        this version does not know (written by a newer one) are left out: see ``unknown``."""
        known = {name: value for name, value in values.items() if name in cls.names()}
        return cls(**known, **functions)

    @classmethod
    def unknown(cls, values: Mapping[str, Any]) -> list[str]:
        """The names in ``values`` that are no option of this version (sorted)."""
        return sorted(set(values) - cls.names())


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class MeterKeywords(TypedDict, total=False):
    """The options ``MFUMeter`` takes as keyword arguments: names and types of ``MFUOptions``'s fields,
    for IDEs and type checkers (defaults, meaning and checks are ``MFUOptions``'s)."""

    peak_tflops: float | None
    dtype: str | torch.dtype | None
    warmup_steps: int
    token_counter: Callable[[Any], Mapping[str, torch.Tensor]] | None
    forward: Callable[[torch.nn.Module, Any], Any] | None
    silence_diagnostics: Iterable[str]
    real_step: str
    profile_steps: int
    profile_start: int | None


class OptionKeywords(MeterKeywords, total=False):
    """Every option, as the callbacks take them (``MFUCallback(**options)``, ``MFUTracker(..., **options)``)."""

    log_interval: int | None
    prefix: str
    report: bool
    summary_dir: str | None


def meter_options(options: MFUOptions | None, keywords: Mapping[str, Any]) -> MFUOptions:
    """``MFUMeter``'s options: given whole, or as keyword arguments. A name the meter does not take raises
    TypeError, as an unknown keyword does (the reporting options belong to the integrations)."""
    if options is not None:
        if keywords:
            raise TypeError("MFUMeter() takes options= or option keywords, not both")
        return options
    unexpected = sorted(set(keywords) - MeterKeywords.__optional_keys__)
    if unexpected:
        raise TypeError(f"MFUMeter() got an unexpected keyword argument {unexpected[0]!r}")
    return MFUOptions(**keywords)
