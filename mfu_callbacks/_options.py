"""Options shared by every integration, under the same names, validated once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .diagnostics import validate_ids

_DTYPE_NAMES = ("fp32", "tf32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class MFUOptions:
    """What a user can set on any of the callbacks.

    peak_tflops: dense peak TFLOP/s per GPU, for hardware the table does not know (or to override it).
    dtype: the precision the matmuls run in ("bf16", "fp16", "tf32", "fp32", "fp8" or a torch dtype);
        detected from the framework's precision setting when omitted.
    warmup_steps: optimizer steps left out of the averages (compilation, allocator warm-up).
    log_interval: log every N optimizer steps; None follows the framework's own logging cadence.
    prefix: prepended to every metric name (``train/`` puts MFU beside ``train/loss``).
    token_counter: fn(batch) -> dict with "input_ids" (and "attention_mask"), for unusual batches.
    forward: fn(model, batch) for models that do not take the batch as keyword arguments.
    report: print the end-of-run report (rank 0) when training ends.
    silence_diagnostics: ids of diagnoses never to report (see ``mfu_callbacks.diagnostics``).
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

    def __post_init__(self) -> None:
        if self.peak_tflops is not None and not (isinstance(self.peak_tflops, (int, float)) and self.peak_tflops > 0):
            raise ValueError(f"peak_tflops must be a positive number of TFLOP/s per GPU, got {self.peak_tflops!r}")
        if isinstance(self.dtype, str) and self.dtype not in _DTYPE_NAMES and "-" not in self.dtype:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPE_NAMES)} or a torch dtype, got {self.dtype!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}")
        if self.log_interval is not None and (not isinstance(self.log_interval, int) or self.log_interval < 1):
            raise ValueError(f"log_interval must be a whole number >= 1 or None, got {self.log_interval!r}")
        if not isinstance(self.prefix, str):
            raise ValueError(f"prefix must be a string such as 'train/', got {self.prefix!r}")
        object.__setattr__(self, "silence_diagnostics", validate_ids(self.silence_diagnostics))
        for name in ("token_counter", "forward"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be a function, got {type(value).__name__}")
