"""The exact per-step formula from the probes' totals: FLOPs = c . features, solved per component and
per pass (forward, backward, recompute, forced, kernel) by least squares, and checked to be exact."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .components import ATTENTION_SCORES, windowed_scores
from .dtypes import untagged
from .features import NUM_FEATURES, WINDOW_FEATURES, Feature, stream_features
from .meta_copy.trace import ComponentFlops

logger = logging.getLogger("mfu_callbacks")

FIT_TOLERANCE = 1e-6  # the largest residual of an exact fit, relative to the largest total


@dataclass
class ComponentCoefficients:
    """Forward, backward, recompute, forced-backward and kernel FLOPs of one component per unit of each
    feature (length NUM_FEATURES); the last three are hardware FLOPs only (see ``ComponentFlops``)."""

    forward: list[float]
    backward: list[float]
    recompute: list[float]
    forced: list[float]
    kernel: list[float]


# The fields of ComponentFlops and ComponentCoefficients, in the order the fit solves them.
PARTS = ("forward", "backward", "recompute", "forced", "kernel")


def fit(
    totals: list[dict[str, ComponentFlops]], shapes: Sequence[tuple[int, int, int]]
) -> dict[str, ComponentCoefficients]:
    """Solve totals = design @ coefficients exactly, per component and per pass."""
    design = torch.tensor(
        [stream_features(rows, main, decoder or None) for rows, main, decoder in shapes], dtype=torch.float64
    )
    active = [i for i in range(NUM_FEATURES) if design[:, i].abs().sum() > 0]
    reduced = design[:, active]
    components = sorted({name for probe in totals for name in probe})
    targets = torch.tensor(
        [
            [getattr(probe.get(name, ComponentFlops()), part) for name in components for part in PARTS]
            for probe in totals
        ],
        dtype=torch.float64,
    )
    solution = torch.linalg.lstsq(reduced, targets).solution if components else torch.zeros(len(active), 0)
    residual = (reduced @ solution - targets).abs().max().item() if components else 0.0
    scale = max(targets.abs().max().item(), 1.0) if components else 1.0
    if residual > FIT_TOLERANCE * scale:
        logger.warning(
            "mfu_callbacks: FLOPs of this model are not linear in tokens and squared lengths "
            "(fit residual %.3g of %.3g); counts are approximate",
            residual,
            scale,
        )
    coefficients: dict[str, ComponentCoefficients] = {}
    for index, name in enumerate(components):
        parts = []
        for offset in range(len(PARTS)):
            full = [0.0] * NUM_FEATURES
            for column, feature in enumerate(active):
                value = solution[column, len(PARTS) * index + offset].item()
                full[feature] = 0.0 if abs(value) < 1e-9 * scale else value
            parts.append(full)
        if any(any(p) for p in parts):
            coefficients[name] = ComponentCoefficients(*parts)
    return coefficients


def assign_windows(coefficients: dict[str, ComponentCoefficients]) -> dict[str, ComponentCoefficients]:
    """Scores and values of windowed layers scale with their window's squares: the probes, shorter than
    any window, fitted them to the full squares, the same per square. They join ATTENTION_SCORES."""
    for slot, feature in enumerate(WINDOW_FEATURES):
        for key in [key for key in coefficients if untagged(key)[0] == windowed_scores(slot)]:
            windowed = coefficients.pop(key)
            scores = coefficients.setdefault(
                key.replace(windowed_scores(slot), ATTENTION_SCORES, 1),
                ComponentCoefficients(*([0.0] * NUM_FEATURES for _ in PARTS)),
            )
            for part, into in zip(
                (getattr(windowed, name) for name in PARTS), (getattr(scores, name) for name in PARTS)
            ):
                part[feature], part[Feature.SQUARES] = part[Feature.SQUARES], 0.0
                for index, value in enumerate(part):
                    into[index] += value
    return coefficients
