"""The work of one training step, read from a forward and backward on the meta device (nothing computed).

Every matmul that autograd runs is recorded with its shape and operand layout, counted per step;
attention (``scaled_dot_product_attention``) is recorded as one call per layer with its query, key
and value shapes, and replaced by a stub that computes nothing, so its own matmuls do not show up
among the GEMMs. Everything else that moves data (norms, activations, residual adds, casts, the
loss) is recorded op by op, with the layout of its tensors (to replay it on a device and time
it) and the bytes it reads and writes (to model it where it cannot be replayed), as if each op
were one kernel, as eager PyTorch runs them. Views cost nothing and are left out.

Mixed precision: autocast does not run on the meta device, so it is done here as autocast does
it, above autograd: the ops autocast runs in lower precision (linear, matmul, mm, bmm, addmm,
baddbmm, einsum, SDPA) get their fp32 tensors cast first. The casts, and in the backward the
gradients cast back to the fp32 weights, are then traced like any other op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._torch_internals import READ_SCALAR, TorchDispatchMode
from ..flops.matmul_ops import attention_backward_flops, attention_flops, gemm_flops, gemm_operands

# Ops that reshape without moving data (not all are marked as views in their schema), or only allocate.
_FREE = frozenset({"_unsafe_view", "_reshape_alias", "empty", "empty_like", "empty_strided", "lift_fresh"})


@dataclass(frozen=True, order=True)
class MatmulShape:
    """One GEMM: ``batch`` products of (m x k) by (k x n); ``a_t``/``b_t``: the operand is a transposed view."""

    batch: int
    m: int
    k: int
    n: int
    a_t: bool = False
    b_t: bool = False

    @property
    def flops(self) -> float:
        return gemm_flops((self.batch, self.m, self.k), (self.k, self.n))


@dataclass(frozen=True, order=True)
class AttentionShape:
    """One attention call (forward, and backward where it runs) as SDPA computes it.

    heads / kv_heads: of the query and of the key and value (grouped-query attention); masked: an
    explicit mask (a packed row's block diagonal) rather than ``is_causal``.
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    v_dim: int
    causal: bool
    masked: bool
    backward: bool

    @property
    def forward_flops(self) -> float:
        """Scores and values, every pair counted (no causal discount, the model-FLOP convention)."""
        return attention_flops(self.batch, self.heads, self.q_len, self.k_len, self.head_dim, self.v_dim)

    @property
    def flops(self) -> float:
        """Forward and, where it runs, backward (dV, dP, dQ, dK, each half of the forward)."""
        forward = self.forward_flops
        return forward + (attention_backward_flops(forward, True, True, True) if self.backward else 0.0)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's layout without its data: enough to make one like it on a device."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass(frozen=True)
class OpCall:
    """One op that is neither matmul nor attention, its tensors as specs; ``moved``: bytes read and written."""

    func: Any
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]
    moved: int


@dataclass
class StepTrace:
    """What one step runs: GEMMs, attention calls and the other ops, each with its count per step."""

    matmuls: Counter[MatmulShape] = field(default_factory=Counter)
    attention: Counter[AttentionShape] = field(default_factory=Counter)
    other: Counter[OpCall] = field(default_factory=Counter)

    @property
    def other_bytes(self) -> int:
        return sum(call.moved * count for call, count in self.other.items())

    @property
    def other_ops(self) -> int:
        return sum(self.other.values())


class _AttentionStub(torch.autograd.Function):
    """SDPA's output shape without computing it; its backward returns empty gradients."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.shapes = query, key, value
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty_like(tensor) for tensor in ctx.shapes)


_F = torch.nn.functional
# What autocast runs in lower precision (torch's autocast op list), as the functions models call.
_LOWER_PRECISION = frozenset(
    {
        _F.linear,
        _F.scaled_dot_product_attention,
        _F.conv1d,
        _F.conv2d,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.einsum,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
    }
)


class _FunctionLevel(TorchFunctionMode):
    """Autocast's casts (where ``autocast`` is a dtype), and each ``scaled_dot_product_attention`` call
    recorded and replaced by the stub."""

    def __init__(self, trace: StepTrace, autocast: torch.dtype | None) -> None:
        super().__init__()
        self.trace = trace
        self.autocast = autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None and func in _LOWER_PRECISION:
            args = tuple(self._cast(arg) for arg in args)
            kwargs = {name: self._cast(value) for name, value in kwargs.items()}
        if func is not _F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self._attention(args, kwargs)

    def _cast(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(item) for item in value)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            return value.to(self.autocast)
        return value

    def _attention(self, args: tuple, kwargs: dict) -> torch.Tensor:
        query, key, value = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = bool(args[5] if len(args) > 5 else kwargs.get("is_causal", False))
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        *batch, heads, q_len, head_dim = query.shape
        shape = AttentionShape(
            batch=int(torch.Size(batch).numel()),
            heads=int(heads),
            kv_heads=int(key.shape[-3]),
            q_len=int(q_len),
            k_len=int(key.shape[-2]),
            head_dim=int(head_dim),
            v_dim=int(value.shape[-1]),
            causal=causal,
            masked=mask is not None,
            backward=backward,
        )
        self.trace.attention[shape] += 1
        return _AttentionStub.apply(query, key, value)


class _Recorder(TorchDispatchMode):
    """Counts GEMM shapes and sums the bytes the other ops move."""

    def __init__(self, trace: StepTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is READ_SCALAR and args[0].dtype == torch.bool:
            # A meta tensor has no value: checks such as ``pad_token_id in input_ids`` take the False branch.
            return False
        out = func(*args, **kwargs)
        pair = gemm_operands(func, args)
        if pair is not None:
            self.trace.matmuls[_shape(*pair)] += 1
        elif not func.is_view and func.overloadpacket.__name__ not in _FREE:
            moved = sum(
                t.numel() * t.element_size() for t in _tensors(args) + _tensors(kwargs) + _tensors(out)
            )
            if moved:
                spec = tuple((key, _spec(value)) for key, value in kwargs.items())
                self.trace.other[OpCall(func, _spec(args), spec, moved)] += 1
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _spec(value: Any) -> Any:
    """Tensors as specs, lists as tuples (hashable); other values as they are."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), int(value.storage_offset()), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(item) for item in value)
    return value


def _transposed(tensor: torch.Tensor) -> bool:
    """Whether a matrix (or batch of them) is a transposed view: its last dimension is not the contiguous one."""
    return tensor.dim() >= 2 and tensor.stride(-1) != 1 and tensor.stride(-2) == 1


def _shape(first: torch.Tensor, second: torch.Tensor) -> MatmulShape:
    if first.dim() == 3:
        batch, m, k = first.shape
    else:
        (m, k), batch = first.shape, 1
    return MatmulShape(
        int(batch), int(m), int(k), int(second.shape[-1]), _transposed(first), _transposed(second)
    )


def trace_step(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    autocast: torch.dtype | None = None,
    forward: Callable | None = None,
) -> StepTrace:
    """Run one forward and backward of a meta-device ``model`` on a meta ``batch``, recording its work.

    ``autocast``: the lower-precision dtype of mixed precision (fp32 weights, bf16 matmuls, as HF
    Trainer's ``bf16=True`` and Lightning's "bf16-mixed"); None runs everything in the model's dtype.
    """
    trace = StepTrace()
    run = forward or (lambda module, inputs: module(**inputs))
    with _FunctionLevel(trace, autocast), _Recorder(trace):
        output = run(model, batch)
        loss = output if isinstance(output, torch.Tensor) else output.loss
        loss.backward()
    return trace
