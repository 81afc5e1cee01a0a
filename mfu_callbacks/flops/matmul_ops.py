"""The matmul and attention ops every counter recognises: where their operands are, and their FLOPs.

One registry, in the style of torch's ``torch/utils/flop_counter.py`` (``register_flop_formula``):
each matmul-like aten op (by packet) is registered once with the argument positions of its two
operands and the formula of its FLOPs. The meta-device copy's recorder (``meta_copy/trace.py``), the
real-step observer (``observe.py``), the profiled steps (``_profiled_steps.py``) and the doctor's step
trace (``doctor/step_trace.py``) all read it. Fused attention has its formulas here too: its forward
per (query, key) pair and the products of its backward.

fp8 matmuls (``_scaled_mm``: tensorwise or rowwise scales) are matmuls like any other: 2 * m * n * k
per product; the scales multiplied in by the kernel are not counted, nor is computing them (an amax,
a division: elementwise work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import flop_registry

from .._torch_internals import CONVOLUTION_KERNEL, EXTRA_MATMULS, HEADS_SECOND_TO_LAST, wrapped_tensors

aten = torch.ops.aten

# A FLOP formula: (first operand's shape, second operand's shape, the op's arguments, its output) ->
# FLOPs. The arguments and output are there for what shapes alone do not say (a convolution's stride).
FlopFormula = Callable[[Sequence[int], Sequence[int], Sequence[Any], Any], float]

# Matmul-like ops (by packet) and the argument positions of their two operands; their formulas.
MATMUL_OPERANDS: dict[Any, tuple[int, int]] = {}
_FORMULAS: dict[Any, FlopFormula] = {}
_Formula = TypeVar("_Formula", bound=FlopFormula)

CONVOLUTIONS = (aten.convolution, CONVOLUTION_KERNEL.overloadpacket)
FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
)


def register_flop_formula(
    *packets: Any, operands: tuple[int, int] = (0, 1)
) -> Callable[[_Formula], _Formula]:
    """Register ``formula`` as the FLOPs of each op packet, whose two operands are the arguments at ``operands``."""

    def register(formula: _Formula) -> _Formula:
        for packet in packets:
            MATMUL_OPERANDS[packet] = operands
            _FORMULAS[packet] = formula
        return formula

    return register


@register_flop_formula(aten.mm, aten.bmm, *EXTRA_MATMULS)
@register_flop_formula(aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_, operands=(1, 2))
def gemm_flops(
    first: Sequence[int], second: Sequence[int], args: Sequence[Any] = (), out: Any = None
) -> float:
    """A (batched or grouped) matrix product: 2 * m * n * k per product, a multiply and an add per term."""
    if len(first) == 2 and len(second) == 3:  # grouped: each row of `first` meets one expert matrix
        return 2.0 * first[0] * first[1] * second[-1]
    if len(first) == 3 and len(second) == 2:  # a batch of rows against one matrix
        return 2.0 * first[0] * first[1] * first[2] * second[-1]
    batch = first[0] if len(first) == 3 else 1  # bmm: `batch` products of (m x k) by (k x n)
    return 2.0 * batch * first[-2] * first[-1] * second[-1]


@register_flop_formula(*CONVOLUTIONS)
def convolution_flops(first: Sequence[int], second: Sequence[int], args: Sequence[Any], out: Any) -> float:
    """A convolution, as torch's own counter has it (stride, padding and groups read from the arguments)."""
    return float(flop_registry[aten.convolution](*args[:9], out_val=out))


GEMMS = frozenset(packet for packet in MATMUL_OPERANDS if packet not in CONVOLUTIONS)


def operands(func: Any, args: Sequence[Any]) -> tuple[Any, Any] | None:
    """The two operands of a matmul-like op; None for any other op."""
    positions = MATMUL_OPERANDS.get(func.overloadpacket)
    if positions is None:
        return None
    return args[positions[0]], args[positions[1]]


def gemm_operands(func: Any, args: Sequence[Any]) -> tuple[Any, Any] | None:
    """The two operands of a matrix product (convolutions left out); None for any other op."""
    return operands(func, args) if func.overloadpacket in GEMMS else None


def matmul_flops(func: Any, args: Sequence[Any], out: Any) -> float:
    """FLOPs of one matmul-like op, by its registered formula."""
    packet = func.overloadpacket
    first, second = (args[i] for i in MATMUL_OPERANDS[packet])
    return _FORMULAS[packet](first.shape, second.shape, args, out)


def is_fp8(tensor: object) -> bool:
    """An fp8 operand: fp8 data, or a tensor subclass that holds some (torchao's ``Float8TrainingTensor``
    reports its high-precision dtype and multiplies its fp8 data with ``_scaled_mm``)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    return tensor.dtype in FP8_DTYPES or any(t.dtype in FP8_DTYPES for t in wrapped_tensors(tensor))


def profiler_name(packet: Any) -> str:
    """How torch's profiler names an op: ``aten::mm`` for ``aten.mm``."""
    return str(packet).replace(".", "::", 1)


# Matrix products by the name torch's profiler gives them, with their operands' positions.
PROFILED_GEMMS: dict[str, tuple[int, int]] = {
    profiler_name(packet): MATMUL_OPERANDS[packet] for packet in GEMMS
}


# -- attention ---------------------------------------------------------------------------------------
def attention_flops(batch: int, heads: int, q_len: int, k_len: int, qk_dim: int, v_dim: int) -> float:
    """Forward FLOPs of attention, every (query, key) pair counted (no causal discount, the model-FLOP
    convention): per pair and head, the scores Q K^T take 2 * qk_dim and the values P V 2 * v_dim
    (nanoGPT's and PaLM's 6N + 12 L H Q T counts the same two products)."""
    return 2.0 * batch * heads * q_len * k_len * (qk_dim + v_dim)


def attention_heads(func: Any, query: torch.Tensor) -> int:
    """Query heads of a fused attention kernel's query. Layouts: [B, H, L, D] (SDPA), [B, L, H, D] and
    [T, H, D] (the flash and memory-efficient kernels, variable lengths)."""
    return int(query.shape[-2] if func in HEADS_SECOND_TO_LAST or query.dim() == 3 else query.shape[1])


def attention_flops_per_square(func: Any, query: torch.Tensor, value: torch.Tensor) -> float:
    """Forward FLOPs of fused attention per (query, key) pair of one sequence: 2 * heads * (d_qk + d_v)."""
    return attention_flops(1, attention_heads(func, query), 1, 1, query.shape[-1], value.shape[-1])


def attention_backward_halves(query: bool, key: bool, value: bool) -> int:
    """Backward products of attention whose inputs need (True) a gradient, each half the forward:
    dV = P^T dO (for the value), dP = dO V^T (for the query or the key), dQ = dS K, dK = dS^T Q."""
    return value + (query or key) + query + key


def attention_backward_flops(forward: float, query: bool, key: bool, value: bool) -> float:
    """Backward FLOPs of attention of ``forward`` FLOPs (every input needing a gradient: twice the forward)."""
    return forward / 2 * attention_backward_halves(query, key, value)
