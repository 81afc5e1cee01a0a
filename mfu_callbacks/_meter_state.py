"""The meter's state in a checkpoint: what a resumed run needs to continue this run's summary, as plain
(JSON-able) values, and how an earlier version's state is read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._window import RunTotals
from .diagnostics import Diagnostics
from .flops.features import NUM_FEATURES

if TYPE_CHECKING:
    from .meter import MFUMeter

STATE_VERSION = 1


def meter_state(
    run: RunTotals, run_features: torch.Tensor | None, diagnostics: Diagnostics
) -> dict[str, Any]:
    """The run totals, the FLOP features read so far and the diagnoses fired."""
    return {
        "version": STATE_VERSION,
        "run": run.state_dict(),
        "run_features": run_features.tolist() if run_features is not None else None,
        "diagnoses": diagnostics.state_dict(),
    }


def read_meter_state(state: Mapping[str, Any]) -> tuple[RunTotals, torch.Tensor | None, list[Any]]:
    """The run totals, the features and the diagnoses of ``meter_state()``'s values; a state of another
    version raises ValueError."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"cannot resume MFU from state version {state.get('version')!r}: "
            f"this mfu-callbacks writes version {STATE_VERSION}"
        )
    run = RunTotals.from_state_dict(state["run"])
    features = state.get("run_features")
    if features is not None:  # written before columns were appended (attention windows): they were 0
        features = [list(row) + [0] * (NUM_FEATURES - len(row)) for row in features]
    tensor = torch.tensor(features, dtype=torch.int64) if features is not None else None
    return run, tensor, state.get("diagnoses", [])


# What a session adds to the meter's state: the global step (for frameworks without one of their own) and
# the options the run was measured with (``MFUOptions.to_json``).
SAVED_STEP = "optimizer_steps"
SAVED_OPTIONS = "options"


def saved_step(state: Mapping[str, Any]) -> int | None:
    """The global step a saved state was written at; None when it holds none."""
    step = state.get(SAVED_STEP)
    return step if isinstance(step, int) and step > 0 else None


def load_or_discard(meter: MFUMeter, state: Mapping[str, Any], warn: Callable[[str], None]) -> None:
    """Continue the saved run totals; a corrupt or foreign-version state is discarded with one
    warning and measuring goes on from this run's steps alone."""
    before = meter.state_dict()
    try:
        meter.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - a bad checkpoint file never stops measuring
        meter.load_state_dict(before)
        warn(
            f"mfu_callbacks: ignored the saved MFU state ({type(error).__name__}: {str(error)[:200]}); "
            "the run totals start afresh from this run's steps"
        )
