"""The checks, one function each, in the order they run, with one module per family: shapes
(alignment of the LM head and of linear layers), waste (padding, recompute), timing (input wait,
stragglers, GPU clocks) and precision (fp32 adapters).

Each takes a :class:`~mfu_callbacks.diagnostics.review.Review` (what the meter holds at a read) and
returns a :class:`~mfu_callbacks.diagnostics.review.Diagnosis` or None.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..review import Check, Diagnosis, FlopSplit, Review, split_flops
from .precision import fp32_adapters
from .shapes import MATMUL_ALIGNMENT, matmul_alignment, vocab_alignment
from .timing import gpu_clocks, input_bound, stragglers
from .waste import padding_waste, recompute_cost

# Every check under its diagnosis id, in the order they run (and report).
CHECKS: Mapping[str, Check] = {
    "vocab_alignment": vocab_alignment,
    "padding_waste": padding_waste,
    "input_bound": input_bound,
    "stragglers": stragglers,
    "recompute_cost": recompute_cost,
    "matmul_alignment": matmul_alignment,
    "fp32_adapters": fp32_adapters,
    "gpu_clocks": gpu_clocks,
}
# Old ids of renamed checks: silencing by the old id still works (with a FutureWarning naming the new one).
RENAMED: Mapping[str, str] = {
    "vocab_not_multiple_of_64": "vocab_alignment",
    "matmul_shapes": "matmul_alignment",
}

__all__ = [
    "CHECKS",
    "MATMUL_ALIGNMENT",
    "RENAMED",
    "Check",
    "Diagnosis",
    "FlopSplit",
    "Review",
    "split_flops",
]
