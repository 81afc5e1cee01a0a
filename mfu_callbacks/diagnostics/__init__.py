"""Diagnoses: what is costing a run MFU, each with the number that shows it and the fix.

The checks read what the meter already holds when its metrics are read (log time): the model's
shapes, the run's token and FLOP totals, the step timings, and where NVML is installed the GPU's
SM clock. Nothing here runs per step or waits for the GPU. Each diagnosis has a stable id, fires at
most once per run and can be silenced by id:

    meter = MFUMeter(model, silence_diagnostics=["matmul_alignment"])
    ...
    for diagnosis in meter.diagnostics():
        print(diagnosis)            # [padding_waste] padding is 31.0% of computed tokens ...

Each check is one function in ``checks/`` (one module per family), listed under its id in
``checks.CHECKS``. Only torch is imported (NVML's ``pynvml`` lazily, when present).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .. import distributed
from .._window import PeakFlops, RunTotals
from .checks import CHECKS, RENAMED
from .clocks import ClockLog
from .measured import MatmulTime
from .model_shapes import ModelShapes, read_shapes
from .review import Diagnosis, Review, split_flops

logger = logging.getLogger("mfu_callbacks")

DIAGNOSIS_IDS = tuple(CHECKS)
GPU_CLOCKS = "gpu_clocks"


def validate_ids(ids: Iterable[str]) -> tuple[str, ...]:
    """The ids as a tuple; ValueError naming the known ids when one is unknown.

    The old id of a renamed check stands for its new id, with a FutureWarning naming it.
    """
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):  # None too: [] silences none
        raise ValueError(f"silence_diagnostics must be a list of diagnosis ids ([] for none), got {ids!r}")
    ids = tuple(ids)
    if not all(isinstance(item, str) for item in ids):
        raise ValueError(f"silence_diagnostics must be a list of diagnosis ids ([] for none), got {ids!r}")
    for old in dict.fromkeys(item for item in ids if item in RENAMED):
        warnings.warn(
            f"silence_diagnostics: {old!r} is now {RENAMED[old]!r} (it reports a cost only where one was "
            f"measured); it is silenced, but write {RENAMED[old]!r}",
            FutureWarning,
            stacklevel=2,
        )
    ids = tuple(dict.fromkeys(RENAMED.get(item, item) for item in ids))
    unknown = [item for item in ids if item not in DIAGNOSIS_IDS]
    if unknown:
        raise ValueError(
            f"unknown diagnosis id(s) {', '.join(map(repr, unknown))}: known ids are {', '.join(DIAGNOSIS_IDS)}"
        )
    return ids


class Diagnostics:
    """The checks of one run; ``review`` runs them at each read of the meter, ``fired`` lists what fired."""

    def __init__(self, silence: Iterable[str] = ()) -> None:
        self.silenced = frozenset(validate_ids(silence))
        self.fired: list[Diagnosis] = []
        self._clocks = ClockLog()
        self._shapes: ModelShapes | None = None
        self._model: nn.Module | None = None

    def review(
        self,
        run: RunTotals,
        *,
        model: nn.Module,
        engine: Any | None,
        run_features: torch.Tensor | None,
        peak_flops: PeakFlops | None,
        compute_dtype: str | None,
        autocast_in_training: bool | None = None,
        device_name: str | None = None,
        measured_matmuls: Mapping[str, MatmulTime] | None = None,
        profile_pending: bool = False,
    ) -> list[Diagnosis]:
        """Run every check not silenced on the run read so far; returns the diagnoses new in this review
        (one fired before is updated in place with the run's figures, and not warned about again).

        ``run_features``: this rank's summed features of every step read so far (the engine turns
        them into FLOPs); ``autocast_in_training``: whether autocast was on at the first forward
        (None when no forward was seen); ``device_name``: the GPU as torch names it (picks the
        measured slowdowns); ``measured_matmuls``: matmul times per component from profiled steps;
        ``profile_pending``: profiled steps are still to come (the checks they measure for wait).
        """
        self._model = model
        review = Review(
            run,
            model,
            split_flops(engine, run_features),
            peak_flops,
            compute_dtype,
            autocast_in_training,
            self._clocks,
            self._model_shapes,
            device_name,
            measured_matmuls,
            profile_pending,
        )
        fired = {diagnosis.id: index for index, diagnosis in enumerate(self.fired)}
        new: list[Diagnosis] = []
        for diagnosis_id, check in CHECKS.items():
            if diagnosis_id in self.silenced:
                continue
            try:
                diagnosis = check(review)
            except Exception:  # noqa: BLE001 - a failed check must not cost the run its metrics
                logger.debug("mfu_callbacks: the %s check failed", diagnosis_id, exc_info=True)
                continue
            if diagnosis is None:
                continue  # one that fired earlier keeps its last figures
            if diagnosis_id in fired:
                # Warned once, when it fired; its figures follow the run, so that the report quotes
                # the run's MFU, not that of the read that fired it.
                self.fired[fired[diagnosis_id]] = diagnosis
            else:
                new.append(diagnosis)
        self.fired.extend(new)
        if distributed.rank() == 0:
            for diagnosis in new:
                logger.warning("mfu_callbacks %s", diagnosis)
        return new

    def sample_clock(self, device: torch.device) -> None:
        """Read the SM clock now: call it at log time before waiting for the GPU, while the step's work still runs."""
        if GPU_CLOCKS not in self.silenced and all(d.id != GPU_CLOCKS for d in self.fired):
            self._clocks.sample(device)

    def state_dict(self) -> list[dict[str, Any]]:
        """The diagnoses fired so far, as plain values (a resumed run does not report them again)."""
        return [{**asdict(diagnosis), "details": dict(diagnosis.details)} for diagnosis in self.fired]

    def load_state_dict(self, fired: list[dict[str, Any]]) -> None:
        """The diagnoses a checkpoint fired; those saved under a renamed check's old id count as its new id."""
        self.fired = [Diagnosis(**{**d, "id": RENAMED.get(d["id"], d["id"])}) for d in fired]

    def _model_shapes(self) -> ModelShapes:
        """The model's shapes, read at the first check that needs them."""
        if self._shapes is None:
            assert self._model is not None
            self._shapes = read_shapes(self._model)
        return self._shapes


__all__ = ["DIAGNOSIS_IDS", "Diagnosis", "Diagnostics", "MatmulTime", "validate_ids"]
