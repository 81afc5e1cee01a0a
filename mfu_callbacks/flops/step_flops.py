"""The result type of the FLOP engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (forward + backward), by the conventions of PaLM appendix B.

    ``model_flops`` counts the matmuls the step needs on real tokens, without activation-checkpoint
    recompute (what MFU uses). ``hardware_flops`` counts what ran: padding and recompute included
    (what HFU uses). ``breakdown`` splits ``model_flops`` by component; ``model_by_dtype`` and
    ``hardware_by_dtype`` split them by the dtype the matmuls run in (``flops/dtypes.py``: "fp8", or ""
    for the dtype the run computes in), for MFU by each dtype's peak.
    """

    model_flops: int
    hardware_flops: int
    tokens: int
    padded_tokens: int
    breakdown: dict[str, int] = field(default_factory=dict)
    model_by_dtype: dict[str, int] = field(default_factory=dict)
    hardware_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def padding_fraction(self) -> float:
        """Share of computed tokens that were padding."""
        if self.padded_tokens == 0:
            return 0.0
        return 1.0 - self.tokens / self.padded_tokens
