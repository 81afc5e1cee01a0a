"""mfu-callbacks: Model FLOPS Utilization beside the loss, for PyTorch training loops.

The FLOP engine, the peak table, the step timer and the meter need torch alone; the framework
integrations live in ``mfu_callbacks.lightning``, ``mfu_callbacks.transformers`` and
``mfu_callbacks.accelerate`` and import their framework only when imported.

The names below are imported on first use, so that ``import mfu_callbacks`` (and the command
line's ``--help``) does not pay for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._options import MFUOptions
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

# public name -> the submodule that defines it
_EXPORTS = {
    "BatchError": ".flops",
    "Diagnosis": ".diagnostics",
    "FlopEngine": ".flops",
    "MFUMeter": ".meter",
    "MFUOptions": "._options",
    "ModelIntrospectionError": ".flops",
    "StepFlops": ".flops",
    "declare_flops": ".flops",
    "estimate_step_flops": ".flops",
    "peak_flops": ".hardware",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
