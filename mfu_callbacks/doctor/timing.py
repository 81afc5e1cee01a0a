"""Timing the pieces of a step on this device: GEMMs, attention, a copy, an optimizer step, a tiny kernel.

On a GPU each timing is the GPU's own (CUDA events around a loop of back-to-back calls, after
warm-up calls; the step's small operators replayed from a CUDA graph, so that their launches do not
count); on a CPU it is the wall clock (the best of the repeats). Inputs are random:
matmul speed does not depend on the values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .step_trace import AttentionShape, MatmulShape, OpCall, TensorSpec

_F = torch.nn.functional
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 24}  # bytes copied to measure bandwidth (past the caches)
OPTIMIZER_CAP = 1 << 28  # parameters timed at most; a larger model's optimizer step is scaled up


class Timer:
    """Seconds per call of a function on one device."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 2) -> None:
        self.device = device
        self.repeats = repeats
        self.warmup = warmup

    def seconds(self, function: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            function()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(self.repeats):
                function()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / self.repeats
        best = float("inf")
        for _ in range(self.repeats):
            begin = time.perf_counter()
            function()
            best = min(best, time.perf_counter() - begin)
        return best

    def kernel_seconds(self, function: Callable[[], object]) -> float:
        """Like ``seconds``, but on a GPU without the host's launch time: the calls are captured in a
        CUDA graph and replayed. A small op launched back to back is bound by the host's launches,
        which a real step overlaps with the kernels of large ones; falls back to ``seconds`` for ops a
        graph cannot capture (ones that sync, or allocate on the host)."""
        if self.device.type != "cuda":
            return self.seconds(function)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    function()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.repeats):
                    function()
        except Exception:  # noqa: BLE001 - not capturable: timed with its launches
            torch.cuda.synchronize(self.device)
            return self.seconds(function)
        return self.seconds(graph.replay) / self.repeats


def _matrix(rows: int, cols: int, batch: int, transposed: bool, dtype: torch.dtype, device: torch.device):
    """A (batch x) rows x cols operand, laid out as the step has it (a transposed view where it is one)."""
    shape = (cols, rows) if transposed else (rows, cols)
    tensor = torch.randn((batch, *shape) if batch > 1 else shape, dtype=dtype, device=device)
    return tensor.transpose(-1, -2) if transposed else tensor


def time_matmul(shape: MatmulShape, dtype: torch.dtype, timer: Timer) -> float:
    """Seconds of one GEMM of this shape and layout."""
    a = _matrix(shape.m, shape.k, shape.batch, shape.a_t, dtype, timer.device)
    b = _matrix(shape.k, shape.n, shape.batch, shape.b_t, dtype, timer.device)
    product = torch.bmm if shape.batch > 1 else torch.mm
    return timer.seconds(lambda: product(a, b))


def block_causal_mask(length: int, segments: int, device: torch.device) -> torch.Tensor:
    """A boolean mask for a row of ``segments`` equal documents: causal within each, nothing across
    (what a model that keeps packed documents apart passes to SDPA)."""
    position = torch.arange(length, device=device)
    document = position // -(-length // segments)
    return (document[:, None] == document[None, :]) & (position[:, None] >= position[None, :])


def time_attention(shape: AttentionShape, dtype: torch.dtype, timer: Timer, segments: int = 1) -> float:
    """Seconds of one SDPA call of this shape, forward and (where the step runs it) backward.

    A masked call gets a block-causal boolean mask of ``segments`` documents.
    """
    device = timer.device

    def tensor(heads: int, length: int, dim: int) -> torch.Tensor:
        return torch.randn(
            shape.batch, heads, length, dim, dtype=dtype, device=device, requires_grad=shape.backward
        )

    # With a mask, transformers repeats the key and value heads itself (SDPA's enable_gqa with a mask
    # falls back to the math kernel): time what it runs.
    kv_heads = shape.heads if shape.masked else shape.kv_heads
    query = tensor(shape.heads, shape.q_len, shape.head_dim)
    key, value = (
        tensor(kv_heads, shape.k_len, shape.head_dim),
        tensor(kv_heads, shape.k_len, shape.v_dim),
    )
    mask = block_causal_mask(shape.q_len, segments, device) if shape.masked else None
    options = {"enable_gqa": True} if shape.heads != kv_heads else {}
    grad = torch.randn(shape.batch, shape.heads, shape.q_len, shape.v_dim, dtype=dtype, device=device)

    def run() -> None:
        out = _F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=shape.causal and mask is None, **options
        )
        if shape.backward:
            torch.autograd.grad(out, (query, key, value), grad)

    return timer.seconds(run)


def copy_bandwidth(timer: Timer) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    size = COPY_BYTES.get(timer.device.type, COPY_BYTES["cpu"])
    source = torch.empty(size, dtype=torch.uint8, device=timer.device)
    target = torch.empty_like(source)
    return 2 * size / timer.seconds(lambda: target.copy_(source))


def tiny_kernel_seconds(timer: Timer) -> float:
    """Seconds of one elementwise op on a few numbers: the least any op of a step takes, launch included."""
    values = torch.zeros(8, device=timer.device)
    return timer.seconds(lambda: values.add_(1.0))


def time_optimizer(shapes: Sequence[torch.Size], timer: Timer) -> tuple[float, int]:
    """Seconds of one AdamW step (fused on CUDA, foreach elsewhere) over fp32 parameters of these shapes,
    and the number of parameters timed; beyond ``OPTIMIZER_CAP`` parameters the rest is left out
    (the step is memory-bound: the caller scales by the parameter count)."""
    params = [
        torch.zeros(size, device=timer.device, requires_grad=True)
        for size in optimizer_parameters_timed(shapes)
    ]
    if not params:
        return 0.0, 0
    total = sum(param.numel() for param in params)
    for param in params:
        param.grad = torch.randn_like(param)
    fused = timer.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused, foreach=None if fused else True)
    return timer.seconds(optimizer.step), total


def optimizer_parameters_timed(shapes: Sequence[torch.Size]) -> list[torch.Size]:
    """The parameters ``time_optimizer`` times: the first ones up to ``OPTIMIZER_CAP`` (at least one)."""
    timed: list[torch.Size] = []
    total = 0
    for size in shapes:
        if total + size.numel() > OPTIMIZER_CAP and timed:
            break
        timed.append(size)
        total += size.numel()
    return timed


def materialize(value: object, device: torch.device) -> object:
    """A spec'd value made real on ``device``: random floats, zero integers (valid indices), devices moved."""
    if isinstance(value, TensorSpec):
        extent = (
            value.offset + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride)) + 1
        )
        if value.dtype.is_floating_point:
            storage = torch.randn(extent, device=device).to(value.dtype)
        else:
            storage = torch.zeros(extent, dtype=value.dtype, device=device)
        return storage.as_strided(value.shape, value.stride, value.offset)
    if isinstance(value, tuple):
        return tuple(materialize(item, device) for item in value)
    if isinstance(value, torch.device):
        return device
    return value


def time_op(call: OpCall, timer: Timer) -> float | None:
    """Seconds of one op replayed on the device with made-up data of the traced layout; None where it
    cannot be replayed (an op that needs particular values)."""
    args = materialize(call.args, timer.device)
    kwargs = {key: materialize(value, timer.device) for key, value in call.kwargs}
    assert isinstance(args, tuple)
    try:
        return timer.kernel_seconds(lambda: call.func(*args, **kwargs))
    except Exception:  # noqa: BLE001 - any op that rejects made-up data is modelled instead
        return None
