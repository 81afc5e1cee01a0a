"""The one table of matmul and attention ops (``flops/matmul_ops.py``) against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks._torch_internals import TorchDispatchMode
from mfu_callbacks.flops.matmul_ops import (
    PROFILED_GEMMS,
    attention_backward_flops,
    attention_flops,
    matmul_flops,
    operands,
    profiler_name,
)


class _Formulas(TorchDispatchMode):
    """Sums the registry's FLOPs of every matmul-like op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if operands(func, args) is not None:
            self.flops += matmul_flops(func, args, out)
        return out


def _truth(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("size", [(3, 5, 7), (4, 16, 2)])
def test_every_gemm_and_convolution_counts_what_torch_counts(size: tuple[int, int, int]) -> None:
    m, k, n = size
    a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    batched_a, batched_b = torch.randn(2, m, k), torch.randn(2, k, n)
    image, kernel = torch.randn(1, 3, m + 4, n + 4), torch.randn(k, 3, 3, 3)
    runs = [
        lambda: torch.mm(a, b),
        lambda: torch.addmm(bias, a, b),
        lambda: torch.bmm(batched_a, batched_b),
        lambda: torch.baddbmm(torch.zeros(2, m, n), batched_a, batched_b),
        lambda: torch.nn.functional.conv2d(image, kernel, stride=2),
    ]
    for run in runs:
        with _Formulas() as ours:
            run()
        assert ours.flops == _truth(run) > 0


@pytest.mark.parametrize("length", [5, 12])
def test_attention_forward_and_backward_are_the_eager_matmuls(length: int) -> None:
    batch, heads, qk_dim, v_dim = 2, 3, 8, 4
    query = torch.randn(batch, heads, length, qk_dim, requires_grad=True)
    key = torch.randn(batch, heads, length, qk_dim, requires_grad=True)
    value = torch.randn(batch, heads, length, v_dim, requires_grad=True)

    def eager() -> torch.Tensor:
        return (query @ key.transpose(-1, -2)).softmax(-1) @ value

    forward = attention_flops(batch, heads, length, length, qk_dim, v_dim)
    assert forward == _truth(eager)
    output = eager()
    assert attention_backward_flops(forward, True, True, True) == _truth(lambda: output.sum().backward())


def test_the_profiled_names_are_torchs_profiler_names() -> None:
    assert profiler_name(torch.ops.aten.addmm) == "aten::addmm"
    assert PROFILED_GEMMS["aten::mm"] == (0, 1) and PROFILED_GEMMS["aten::addmm"] == (1, 2)
    assert "aten::convolution" not in PROFILED_GEMMS  # the profiler does not record a convolution's stride
