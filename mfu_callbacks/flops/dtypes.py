"""The dtype each matmul runs in, carried beside its component through the count to the meter.

MFU judges each matmul against the dense peak of its own dtype (``_window.utilization``), so the count
keeps FLOPs apart by dtype. A matmul of fp8 operands (``_scaled_mm``, or a matmul of fp8 tensor
subclasses: torchao's ``Float8TrainingTensor``) runs in fp8; a module with declared FLOPs runs in the
dtype it declares; every other matmul runs in the dtype the run computes in (``RUN_DTYPE``: autocast's,
else the weights', fp32 as TF32 where torch allows it), which the meter resolves, as it resolved the
one peak before. A step whose matmuls all run in the run's dtype is counted and judged as it always was.

Inside the engine a component's key carries the dtype after ``#`` ("mlp#fp8"); the run's dtype adds
nothing, so such keys are plain component names. Matmuls of a pass without grad inside the step (a
reference model, a scoring pass) end their key with ``!``: they count in the step's model FLOPs like any
other, but are no part of one forward of the model (which generation reads).
"""

from __future__ import annotations

from collections.abc import Iterable

from .matmul_ops import is_fp8

RUN_DTYPE = ""
"""The key of matmuls in the dtype the run computes in (not fp8, not declared otherwise)."""
FP8 = "fp8"
_SEPARATOR = "#"
_WITHOUT_GRAD = "!"


def tagged(component: str, dtype: str | None) -> str:
    """The key of a component's matmuls in ``dtype`` (the component itself for the run's dtype)."""
    return f"{component}{_SEPARATOR}{dtype}" if dtype else component


def untagged(key: str) -> tuple[str, str]:
    """The component and the dtype of a key made by ``tagged`` (or ``without_grad``)."""
    component, _, dtype = key.removesuffix(_WITHOUT_GRAD).partition(_SEPARATOR)
    return component, dtype


def without_grad(key: str) -> str:
    """The key of the same matmuls run in a pass without grad (a reference model, a scoring pass)."""
    return key if key.endswith(_WITHOUT_GRAD) else key + _WITHOUT_GRAD


def is_without_grad(key: str) -> bool:
    return key.endswith(_WITHOUT_GRAD)


def dtype_of_operands(operands: Iterable[object]) -> str:
    """FP8 when an operand holds fp8 data, else ``RUN_DTYPE``."""
    return FP8 if any(is_fp8(operand) for operand in operands) else RUN_DTYPE


def retagged(key: str, dtype: str) -> str:
    """The same component's key in ``dtype`` (a backward matmul run in another dtype than its forward)."""
    return tagged(untagged(key)[0], dtype)
