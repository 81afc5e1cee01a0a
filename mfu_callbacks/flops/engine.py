"""The FLOP engine: built once per model, then evaluated per step from token counts.

Building it copies the model's structure onto the meta device (``meta_copy/replica.py``), runs a few
tiny forward passes of different shapes there (``meta_copy/probes.py``, ``meta_copy/tracing.py``)
while recording every matmul and what its backward needs (``meta_copy/trace.py``), and fits
(``fit.py``) the exact per-step formula

    FLOPs = c . features(batch)

per component, where the features are rows, tokens, squared lengths and calls (``features.py``).
Transformer FLOPs are exactly linear in those features, so the fit is exact; it is checked.
The probes are shorter than any attention window, so the trace sees windowed layers compute full
squares: their scores and values are recorded apart and moved to their window's feature after the fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .components import ATTENTION_SCORES
from .counting.attention_windows import AttentionWindow
from .counting.plans import Plan
from .counting.tokens import BatchError, TokenCounter, TokenCounting
from .dtypes import is_without_grad, untagged
from .features import HARDWARE, MODEL, NUM_FEATURES, Feature
from .fit import ComponentCoefficients, assign_windows, fit
from .meta_copy.probes import (
    PROBES_ENCODER_DECODER,
    PROBES_MAIN,
    PROBES_ROWS,
    Forward,
    ProbeBatches,
    default_forward,
)
from .meta_copy.replica import Replica
from .meta_copy.tracing import trace_probes
from .model_config import token_counting
from .observation import Observation
from .step_flops import StepFlops
from .unwrap import unwrap_model

logger = logging.getLogger("mfu_callbacks")


class ModelIntrospectionError(RuntimeError):
    """The model could be neither introspected nor traced."""


class FlopEngine:
    """Exact training FLOPs of one model, per step, from the step's token counts."""

    def __init__(
        self, coefficients: dict[str, ComponentCoefficients], counting: TokenCounting, description: str
    ) -> None:
        self.counting = counting
        self.description = description
        # Keys are components with the dtype their matmuls run in (``dtypes.py``); the breakdown is by component.
        self.components: dict[str, list[float]] = {}
        model_by_dtype: dict[str, list[float]] = {}
        hardware_by_dtype: dict[str, list[float]] = {}
        for key, c in coefficients.items():
            component, dtype = untagged(key)
            model = [f + b for f, b in zip(c.forward, c.backward)]
            # Hardware FLOPs add what runs beyond the model's needs: the recompute, the forced input
            # gradients and what the attention kernel computes beyond (or short of) every pair.
            hardware = [m + r + f + k for m, r, f, k in zip(model, c.recompute, c.forced, c.kernel)]
            for into, name, values in (
                (self.components, component, model),
                (model_by_dtype, dtype, model),
                (hardware_by_dtype, dtype, hardware),
            ):
                into[name] = [a + b for a, b in zip(into.get(name, [0.0] * NUM_FEATURES), values)]
        self._model_by_dtype, self._hardware_by_dtype = model_by_dtype, hardware_by_dtype
        # The forward alone, per component: what a pass without backward costs (generation, ``generation.py``).
        self.forward_coefficients = {
            name: list(c.forward) for name, c in coefficients.items() if not is_without_grad(name)
        }
        self._model = [sum(values) for values in zip(*self.components.values())] or [0.0] * NUM_FEATURES
        extra = [
            sum(c.recompute[i] + c.forced[i] + c.kernel[i] for c in coefficients.values())
            for i in range(NUM_FEATURES)
        ]
        self._hardware = [m + e for m, e in zip(self._model, extra)]
        # Of those, what activation checkpointing reruns.
        self._recompute = [sum(c.recompute[i] for c in coefficients.values()) for i in range(NUM_FEATURES)]
        self._has_tokens = any(self._model[i] or self._hardware[i] for i in (Feature.TOKENS, Feature.SQUARES))
        # What ``evaluate`` multiplies, read at every log: only the features with a coefficient.
        self._sparse_model, self._sparse_hardware = _sparse(self._model), _sparse(self._hardware)
        self._sparse_components = {name: _sparse(c) for name, c in self.components.items()}
        self._sparse_model_by_dtype = {name: _sparse(c) for name, c in model_by_dtype.items()}
        self._sparse_hardware_by_dtype = {name: _sparse(c) for name, c in hardware_by_dtype.items()}
        self._sparse_recompute = _sparse(self._recompute)

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        batch: Any,
        *,
        forward: Forward | None = None,
        token_counter: TokenCounter | None = None,
    ) -> FlopEngine:
        """Introspect ``model`` (any wrapper) with ``batch`` as the template of what a step sees."""
        base = unwrap_model(model)
        counting = token_counting(model, token_counter)
        windows = counting.windows
        probes = ProbeBatches(batch, counting, custom_forward=forward is not None)
        if probes.main_length is None and probes.decoder_length is None:
            shapes: Sequence[tuple[int, int, int]] = PROBES_ROWS
        elif probes.decoder_length is not None and probes.main_length is not None:
            shapes = PROBES_ENCODER_DECODER
        elif probes.main_length is None:
            raise BatchError(
                "a decoder stream without an encoder stream: pass token_counter= to name the streams"
            )
        else:
            # Rows laid out by image grids keep the template's layout: probes add text after it.
            offset = probes.main_length if probes.grids else 0
            shapes = tuple((rows, offset + main, decoder) for rows, main, decoder in PROBES_MAIN)
        run = forward or default_forward
        errors: list[str] = []
        for fold in (True, False):
            try:
                totals, replica, substituted = trace_probes(
                    model, probes, shapes, run, fold=fold, windows=windows
                )
                break
            except BatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of the model's own code on meta
                errors.append(f"{type(error).__name__}: {error}")
        else:
            raise ModelIntrospectionError(
                f"could not trace {type(base).__name__} on the meta device ({errors[-1]}). If the model does not "
                "take the batch as keyword arguments, pass forward=lambda model, batch: model(...) (returning "
                "the loss); if its forward cannot run on the meta device (custom kernels without a meta "
                "implementation), pass a forward= that runs an equivalent made of torch operations."
            )
        coefficients = assign_windows(fit(totals, shapes))
        description = _describe(base, replica, substituted, coefficients, windows)
        logger.info(description)
        return cls(coefficients, counting, description)

    @classmethod
    def from_observation(
        cls,
        model: nn.Module,
        observation: Observation,
        counting: TokenCounting,
        features: Sequence[Sequence[float]],
    ) -> FlopEngine:
        """The engine fitted to one observed real step (``observe.py``) whose features (model and
        hardware rows, as ``count`` gives them) are given."""
        if observation.failure is not None or not observation.complete:
            raise ModelIntrospectionError(
                f"the observed step of {type(unwrap_model(model)).__name__} could not be counted: "
                + (observation.failure or "no backward ran while it was observed")
            )
        coefficients = {
            name: ComponentCoefficients(*parts) for name, parts in observation.fit(features).items()
        }
        description = (
            f"mfu_callbacks: FLOPs of {type(unwrap_model(model)).__name__} counted on a real training step; "
            f"components: {', '.join(sorted(coefficients))}"
        )
        return cls(coefficients, counting, description)

    # -- per step -------------------------------------------------------------------------------
    def count(self, batch: Any) -> torch.Tensor:
        """Feature tensor of a batch, on its device, without a host sync; sums over micro-batches are valid."""
        return self.counting.count(batch)

    def defer(self, batch: Any) -> tuple[Plan, tuple[torch.Tensor, ...]]:
        """What counting a batch takes on the training step (see ``TokenCounting.defer``)."""
        return self.counting.defer(batch)

    def evaluate(self, features: torch.Tensor | Sequence[Sequence[float]]) -> StepFlops:
        """FLOPs of the step whose (summed) features are given."""
        values = features.tolist() if isinstance(features, torch.Tensor) else features
        model_features, hardware_features = values[MODEL], values[HARDWARE]
        if min(model_features) < 0 or min(hardware_features) < 0:
            raise ValueError(
                f"negative token counts or lengths in the features {values}: counts come from "
                "FlopEngine.count(batch) (summed over micro-batches), never below zero"
            )
        model_flops = _dot(self._sparse_model, model_features)
        hardware_flops = _dot(self._sparse_hardware, hardware_features)
        breakdown = {name: round(_dot(c, model_features)) for name, c in self._sparse_components.items()}
        model_by_dtype = {
            name: round(_dot(c, model_features)) for name, c in self._sparse_model_by_dtype.items()
        }
        hardware_by_dtype = {
            name: round(_dot(c, hardware_features)) for name, c in self._sparse_hardware_by_dtype.items()
        }
        if self._has_tokens:
            tokens = model_features[Feature.TOKENS] + model_features[Feature.DECODER_TOKENS]
            padded = hardware_features[Feature.TOKENS] + hardware_features[Feature.DECODER_TOKENS]
        else:
            tokens = padded = model_features[Feature.ROWS]
        return StepFlops(
            round(model_flops),
            round(hardware_flops),
            int(tokens),
            int(padded),
            breakdown,
            model_by_dtype,
            hardware_by_dtype,
        )

    def recompute_flops(self, features: torch.Tensor | Sequence[Sequence[float]]) -> float:
        """Of the hardware FLOPs of the step whose features are given, those activation checkpointing reran."""
        values = features.tolist() if isinstance(features, torch.Tensor) else features
        return _dot(self._sparse_recompute, values[HARDWARE])

    def estimate(self, batch: Any) -> StepFlops:
        """Count and evaluate one batch (reads the counts back: for tools and tests, not the hot path)."""
        return self.evaluate(self.count(batch).cpu())

    @property
    def dtypes(self) -> frozenset[str]:
        """The dtypes this model's matmuls run in (``dtypes.py``: "" for the run's dtype, "fp8", ...)."""
        return frozenset(self._model_by_dtype) | frozenset(self._hardware_by_dtype)

    @cached_property  # asked at every read, fixed with the coefficients
    def reads_labelled(self) -> bool:
        """Whether any FLOPs depend on the labelled positions (a head that scores only those)."""
        feature = Feature.LABELLED
        return any(
            row[feature]
            for row in (self._model, self._hardware, self._recompute, *self.forward_coefficients.values())
        )

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per token, attention excluded (the part linear in tokens)."""
        return self._model[Feature.TOKENS] + self._model[Feature.DECODER_TOKENS]


_Sparse = tuple[tuple[int, float], ...]  # (feature, coefficient) of the features with a coefficient


def _sparse(coefficients: Sequence[float]) -> _Sparse:
    return tuple((feature, c) for feature, c in enumerate(coefficients) if c)


def _dot(coefficients: _Sparse, features: Sequence[float]) -> float:
    total = 0.0
    for feature, c in coefficients:
        total += c * features[feature]
    return total


def _describe(
    base: nn.Module,
    replica: Replica,
    substituted: list[str],
    coefficients: dict[str, ComponentCoefficients],
    windows: tuple[AttentionWindow, ...] = (),
) -> str:
    folded = f"; repeated layers traced once: {', '.join(replica.folded)}" if replica.folded else ""
    windowed = f"; attention windows: {', '.join(map(str, windows))}" if windows else ""
    analytic = f"; counted from shapes: {', '.join(substituted)}" if substituted else ""
    declared = [replica.names.get(i, "") or type(base).__name__ for i in replica.declarations]
    analytic += f"; FLOPs declared: {', '.join(declared)}" if declared else ""
    scores = (
        " (attention scores from head dimensions x squared lengths)"
        if ATTENTION_SCORES in coefficients
        else ""
    )
    return (
        f"mfu_callbacks: FLOPs of {type(base).__name__} traced on a meta-device replica{scores}{windowed}{folded}"
        f"{analytic}; "
        f"components: {', '.join(sorted(coefficients))}"
    )
