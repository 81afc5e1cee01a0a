"""What timing a step's pieces would allocate, checked against the device's free memory before any of it is.

The step is traced on the meta device (free at any size); timing then makes each piece real, one at a
time: a GEMM's operands and product, an attention call's tensors, an op's inputs, the optimizer's
state. A size typed wrong (a vocabulary of 10**12) would die in the allocator with a traceback, or
page the machine to a halt. The largest piece decides: the pieces are made one after another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .step_trace import StepTrace, TensorSpec
from .timing import optimizer_parameters_timed

_FP32 = 4  # bytes: random data is drawn in fp32, then cast
_OPTIMIZER_TENSORS = 4  # AdamW: parameter, gradient, two moments, fp32


@dataclass(frozen=True)
class Piece:
    """One thing timed, the bytes it allocates and the sizes it has (to tell which option made it big)."""

    what: str
    bytes: int
    sizes: tuple[int, ...]


class TooLarge(ValueError):
    """A piece needs more memory than the device has free."""

    def __init__(self, piece: Piece, available: int, device: torch.device) -> None:
        self.piece, self.available, self.device = piece, available, device
        super().__init__(
            f"timing {piece.what} would allocate about {_size(piece.bytes)}, more than the "
            f"{_size(available)} free on {device}"
        )


def check_fits(
    step: StepTrace, trainable: Sequence[torch.Size], dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ``TooLarge`` for the largest piece when it does not fit the memory free on ``device``."""
    available = free_bytes(device)
    if available is None:
        return
    largest = max(pieces(step, trainable, dtype), key=lambda piece: piece.bytes, default=None)
    if largest is not None and largest.bytes > available:
        raise TooLarge(largest, available, device)


def pieces(step: StepTrace, trainable: Sequence[torch.Size], dtype: torch.dtype) -> list[Piece]:
    """Every piece timing allocates, with its bytes (its padded variants at the next multiple of 64)."""
    size = torch.empty((), dtype=dtype).element_size()
    found = []
    for shape in step.matmuls:
        m, k, n = (_up(value) for value in (shape.m, shape.k, shape.n))
        found.append(
            Piece(
                f"a {shape.m} x {shape.k} x {shape.n} matmul",
                shape.batch * (m * k + k * n + m * n) * size,  # drawn in the dtype itself
                (shape.m, shape.k, shape.n),
            )
        )
    for call in step.attention:
        query = call.batch * call.heads * call.q_len * call.head_dim
        keys = call.batch * call.heads * call.k_len * (call.head_dim + call.v_dim)
        output = call.batch * call.heads * call.q_len * call.v_dim
        total = (query + keys + 2 * output) * (2 if call.backward else 1) * size
        if call.masked:  # the mask, and the scores the math kernel makes of it
            total += call.q_len * call.q_len + 3 * call.batch * call.heads * call.q_len * call.k_len * size
        found.append(
            Piece(
                f"attention over {call.q_len} tokens ({call.heads} heads of {call.head_dim})",
                total,
                (call.batch, call.heads, call.q_len, call.k_len, call.head_dim),
            )
        )
    for op in step.other:
        specs = [
            value
            for value in _flat((op.args, tuple(value for _, value in op.kwargs)))
            if isinstance(value, TensorSpec)
        ]
        made = sum(_extent(spec) * (_FP32 + spec.dtype.itemsize) for spec in specs)
        found.append(
            Piece(
                f"{getattr(op.func, '__name__', op.func)} on {', '.join('x'.join(map(str, spec.shape)) for spec in specs[:2])}",
                made + op.moved,
                tuple(size for spec in specs for size in spec.shape),
            )
        )
    timed = optimizer_parameters_timed(trainable)
    if timed:
        found.append(
            Piece(
                f"the optimizer over {sum(shape.numel() for shape in timed):,} parameters",
                sum(shape.numel() for shape in timed) * _OPTIMIZER_TENSORS * _FP32,
                tuple(size for shape in timed for size in shape),
            )
        )
    return found


def free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now: the GPU's, or the host's available memory; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _extent(spec: TensorSpec) -> int:
    return spec.offset + sum((size - 1) * stride for size, stride in zip(spec.shape, spec.stride)) + 1


def _flat(value: object) -> list[object]:
    if isinstance(value, (tuple, list)):
        return [item for part in value for item in _flat(part)]
    return [value]


def _up(size: int) -> int:
    return -(-size // 64) * 64


def _size(count: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,} bytes"
