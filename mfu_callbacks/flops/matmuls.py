"""The matmul-like aten ops the counters recognise, where their two operands are, and their FLOPs.

One table, read by the meta-device copy's recorder (``trace.py``), the real-step observer
(``observe.py``) and the profile window. fp8 matmuls (``_scaled_mm``: tensorwise or rowwise scales)
are matmuls like any other: 2 * m * n * k per product, the scales multiplied in by the kernel are
not counted, nor is computing them (an amax, a division: elementwise work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

from .._torch_internals import CONVOLUTION_KERNEL, EXTRA_MATMULS, wrapped_tensors

aten = torch.ops.aten

CONVOLUTIONS = (aten.convolution, CONVOLUTION_KERNEL.overloadpacket)
# Matmul-like ops (by packet) and the argument positions of their two operands.
MATMUL_OPERANDS: dict[Any, tuple[int, int]] = {
    aten.mm: (0, 1),
    aten.addmm: (1, 2),
    aten.addmm_: (1, 2),
    aten.bmm: (0, 1),
    aten.baddbmm: (1, 2),
    aten.baddbmm_: (1, 2),
    **{packet: (0, 1) for packet in (*CONVOLUTIONS, *EXTRA_MATMULS)},
}
FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
)


def operands(func: Any, args: Sequence[Any]) -> tuple[Any, Any] | None:
    """The two operands of a matmul-like op; None for any other op."""
    positions = MATMUL_OPERANDS.get(func.overloadpacket)
    if positions is None:
        return None
    return args[positions[0]], args[positions[1]]


def matmul_flops(func: Any, args: Sequence[Any], out: Any) -> float:
    """FLOPs of one matmul-like op from its operands' shapes: 2 * m * n * k per product."""
    packet = func.overloadpacket
    first, second = (args[i] for i in MATMUL_OPERANDS[packet])
    if packet in CONVOLUTIONS:
        return float(flop_registry[aten.convolution](*args[:9], out_val=out))
    if first.dim() == 2 and second.dim() == 3:  # grouped: each row of `first` meets one expert matrix
        return 2.0 * first.shape[0] * first.shape[1] * second.shape[-1]
    if first.dim() == 3 and second.dim() == 2:
        return 2.0 * first.shape[0] * first.shape[1] * first.shape[2] * second.shape[-1]
    batch = first.shape[0] if first.dim() == 3 else 1
    return 2.0 * batch * first.shape[-2] * first.shape[-1] * second.shape[-1]


def is_fp8(tensor: object) -> bool:
    """An fp8 operand: fp8 data, or a tensor subclass that holds some (torchao's ``Float8TrainingTensor``
    reports its high-precision dtype and multiplies its fp8 data with ``_scaled_mm``)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    return tensor.dtype in FP8_DTYPES or any(t.dtype in FP8_DTYPES for t in wrapped_tensors(tensor))


def profiler_name(packet: Any) -> str:
    """How torch's profiler names an op: ``aten::mm`` for ``aten.mm``."""
    return str(packet).replace(".", "::", 1)
