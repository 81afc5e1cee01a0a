"""What one observed real step ran (``observe.py``): its matmuls per component and feature, the
observed backward and recompute, and the fit of its totals into per-feature coefficients."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .dtypes import without_grad
from .features import HARDWARE, MODEL, NUM_FEATURES, Feature
from .meta_copy.trace import ComponentFlops


@dataclass
class _TensorFacts:
    from_batch: bool
    needs_grad: bool  # carries a gradient that training needs (derives from a trainable parameter)
    made_with_grad: bool
    tags: frozenset[int] = frozenset()  # gradient-free forward matmuls upstream (inside a custom Function)
    owner: int | None = None  # id of the module whose parameter alone this tensor derives from
    subset: bool = False  # a selection of the batch's tokens (a boolean-mask index), not all of them


@dataclass
class _Matmul:
    component: str
    feature: Feature
    forward: float  # FLOPs at the observed step, or per unit of the feature (per_unit)
    products: float  # backward products the model needs, in forwards (one per operand carrying one)
    per_unit: bool = False
    with_grad: bool = True  # grad mode was on at the op, or where the custom Function running it was applied
    function: int | None = None  # the sequence number of the custom Function whose forward ran it
    subset: bool = False  # its batch operand holds a selection of the tokens (``hidden[mask]``)
    declared: bool = False  # a module's declared FLOPs (its backward is not observed but declared)
    node: Any = None  # the autograd node of its output (grad mode on), read after the op returns
    reached: bool = False


@dataclass
class Observation:
    """What one observed micro-batch ran, per component and feature."""

    matmuls: list[_Matmul] = field(default_factory=list)
    # The observed backward and checkpoint recompute, per (component, feature, per unit of the feature).
    hardware: dict[tuple[str, Feature, bool], float] = field(default_factory=lambda: defaultdict(float))
    recomputed: dict[tuple[str, Feature, bool], float] = field(default_factory=lambda: defaultdict(float))
    complete: bool = False  # a backward ran to its end
    failure: str | None = None  # why observing stopped, if it failed

    def totals(self) -> dict[tuple[str, Feature, bool, bool], ComponentFlops]:
        """Per (component, feature, per-unit): forward, model backward, checkpoint recompute, and the
        rest of the observed backward beyond the model's (``forced``: a custom backward's recompute,
        gradients forced onto inputs)."""
        totals: dict[tuple[str, Feature, bool, bool], ComponentFlops] = defaultdict(ComponentFlops)
        for matmul in self.matmuls:
            # A pass without grad (a custom Function's forward included, where it was applied with grad
            # off) is kept apart: it is no part of one forward of the model.
            component = matmul.component if matmul.with_grad else without_grad(matmul.component)
            key = (component, matmul.feature, matmul.per_unit, matmul.subset)
            totals[key].forward += matmul.forward
            if matmul.reached:
                totals[key].backward += matmul.forward * matmul.products
                if matmul.declared:  # what ran in its backward is the declaration, hardware too
                    totals[key].forced += matmul.forward * matmul.products
        labelled = self._labelled_components()
        for (name, feature, per_unit), flops in self.recomputed.items():
            feature = Feature.LABELLED if feature == Feature.TOKENS and name in labelled else feature
            totals[(name, feature, per_unit, False)].recompute += flops
        for (name, feature, per_unit), flops in self.hardware.items():
            feature = Feature.LABELLED if feature == Feature.TOKENS and name in labelled else feature
            totals[(name, feature, per_unit, False)].forced += flops
        for part in totals.values():  # the observed backward beyond the model's
            part.forced -= part.backward
        return dict(totals)

    def _labelled_components(self) -> set[str]:
        """Components whose token matmuls in the forward all scored the labelled positions (a head that
        scores only those): what their backward runs scales with them too. A custom backward's matmuls
        are placed by component only (its saved selection may be a tensor the observer no longer knows)."""
        labelled = {m.component for m in self.matmuls if m.feature == Feature.LABELLED}
        return labelled - {m.component for m in self.matmuls if m.feature == Feature.TOKENS}

    def fit(self, features: Sequence[Sequence[float]]) -> dict[str, list[list[float]]]:
        """Per component: [forward, backward, recompute, forced, kernel] coefficients per feature, exact
        at this step, whose features (``MODEL`` and ``HARDWARE`` rows) are given.

        A head that scores only the labelled positions (``Feature.LABELLED``) is fitted per labelled
        position, so its FLOPs follow each batch's labels. Where the batch names none (no ``labels``,
        ``shift_labels`` or TRL mask), it scales with the real tokens at this step's share, as does any
        other matmul on a selection of the tokens: its model coefficient is per real token, and
        ``kernel`` makes up the hardware count of the observed step.
        """
        model_row, hardware_row = features[MODEL], features[HARDWARE]
        coefficients: dict[str, list[list[float]]] = {}
        for (component, feature, per_unit, subset), flops in self.totals().items():
            if feature == Feature.LABELLED and model_row[feature] <= 0:
                feature, subset = Feature.TOKENS, True  # no labels to follow: per real token at this share
            if not hardware_row[Feature.TOKENS] and feature in (Feature.TOKENS, Feature.SQUARES):
                feature = Feature.ROWS  # a batch without token streams (images, tables): all scales by rows
            units = hardware_row[feature]
            if not per_unit and units <= 0:
                raise ValueError(
                    f"the observed step ran {component} matmuls that scale with {feature.name.lower()}, "
                    "of which its batch has none"
                )
            parts = coefficients.setdefault(component, [[0.0] * NUM_FEATURES for _ in range(5)])
            model_units = model_row[feature] if subset and model_row[feature] > 0 else units
            values = (flops.forward, flops.backward, flops.recompute, flops.forced)
            for index, (part, value) in enumerate(zip(parts, values)):
                part[feature] += value if per_unit else value / (model_units if index < 2 else units)
            if subset and not per_unit:
                model = flops.forward + flops.backward
                parts[4][feature] += model / units - model / model_units
        return coefficients
