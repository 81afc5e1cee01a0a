"""Options shared by every integration, under the same names, checked when the callback is built."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import _validate
from .diagnostics import validate_ids


@dataclass(frozen=True)
class MFUOptions:
    """What a user can set on any of the callbacks.

    peak_tflops: dense peak TFLOP/s per GPU, for hardware the table does not know (or to override it).
    dtype: one precision to judge every matmul's FLOPs against ("bf16", "fp16", "tf32", "fp32", "fp8", a
        torch dtype or a Lightning precision string such as "bf16-mixed"); omitted, each matmul is judged
        against the peak of the dtype it runs in (fp8, else the framework's precision, autocast's or the weights').
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
        measured step as it really runs (used instead where the copy cannot be traced or disagrees);
        "only" counts the real step alone; "off" never watches the real step.
    profile_steps: profile this many optimizer steps (at most 100) with ``torch.profiler`` (0, the default: never) and
        report where their time went, by bucket, with the changes that would raise MFU most: in the
        end-of-run report, in W&B and in ``mfu_profile.json`` beside the run summary. The profiled steps
        are left out of the MFU averages.
    profile_start: the optimizer step (0-based) the profile starts at; default: the first after warm-up.
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
        for name in ("token_counter", "forward"):
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
