"""mfu-callbacks: Model FLOPS Utilization beside the loss, for PyTorch training loops.

The FLOP engine, the peak table, the step timer and the meter need torch alone; the framework
integrations live in ``mfu_callbacks.lightning``, ``mfu_callbacks.transformers`` and
``mfu_callbacks.accelerate`` and import their framework only when imported.
"""

from __future__ import annotations

from ._options import MFUOptions
from ._version import __version__
from .diagnostics import Diagnosis
from .flops import (
    BatchError,
    FlopEngine,
    ModelIntrospectionError,
    StepFlops,
    declare_flops,
    estimate_step_flops,
)
from .hardware import peak_flops
from .meter import MFUMeter

__all__ = [
    "BatchError",
    "Diagnosis",
    "FlopEngine",
    "MFUMeter",
    "MFUOptions",
    "ModelIntrospectionError",
    "StepFlops",
    "__version__",
    "declare_flops",
    "estimate_step_flops",
    "peak_flops",
]
