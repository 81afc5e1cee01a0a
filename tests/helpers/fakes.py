"""The fakes the tests share: a host clock that moves when told, FLOP engines of known FLOPs, a peak,
and a process group of two reduced by hand.

The fake engines take the production path: ``defer`` hands the meter a plan made once per shape and
the micro-batch's features, summed only at the read (``_step_counts.py``), as ``TokenCounting.defer``
does for the real engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from mfu_callbacks import distributed
from mfu_callbacks.flops import Plan, whole_plan
from mfu_callbacks.flops.features import HARDWARE, MODEL, NUM_FEATURES, Feature
from mfu_callbacks.flops.step_flops import StepFlops
from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.timer import StepTimer


class FakeClock:
    """A host clock that moves only when told to (from 100 s: a duration is never a reading)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- deferred counting -----------------------------------------------------------------------------
class DeferredFeatures:
    """Counted feature tensors as the meter holds a micro-batch until the read: the plan of a shape is
    made once (the meter groups micro-batches by plan), the tensor itself is what the step took."""

    def __init__(self) -> None:
        self._plans: dict[tuple, Plan] = {}

    def __call__(self, features: torch.Tensor) -> tuple[Plan, tuple[torch.Tensor, ...]]:
        key = (tuple(features.shape), features.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = whole_plan(features.numel(), tuple(features.shape), features.device)
        return plan, (features.reshape(1, -1),)


class CountingEngine:
    """The FlopEngine interface on the hot path: ``defer`` counts the batch with ``count`` (which a
    fake defines) and hands the meter what it holds until the read."""

    _deferred: DeferredFeatures | None = None

    def count(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def defer(self, batch: Any) -> tuple[Plan, tuple[torch.Tensor, ...]]:
        if self._deferred is None:
            self._deferred = DeferredFeatures()
        return self._deferred(self.count(batch))


# -- the meter's fakes: FLOPs linear in tokens, a peak ----------------------------------------------
MODEL_FLOPS_PER_TOKEN = 1e9  # FLOPs the fake model needs per real token
HARDWARE_FLOPS_PER_TOKEN = 1.5e9  # FLOPs it runs per computed token (as if with recompute)
PEAK_FLOPS = 1e12


def batch(tokens: int, padded: int | None = None) -> dict[str, int]:
    """A stand-in batch: how many real and computed tokens it holds."""
    return {"tokens": tokens, "padded": tokens if padded is None else padded}


class FakeEngine(CountingEngine):
    """The FlopEngine interface with FLOPs linear in tokens; counts how often it is asked."""

    def __init__(self) -> None:
        self.counted = 0

    def count(self, fake_batch: dict[str, int]) -> torch.Tensor:
        self.counted += 1
        features = torch.zeros(2, NUM_FEATURES, dtype=torch.int64)
        features[MODEL, Feature.TOKENS] = fake_batch["tokens"]
        features[HARDWARE, Feature.TOKENS] = fake_batch["padded"]
        return features

    def evaluate(self, features: torch.Tensor) -> StepFlops:
        tokens, padded = int(features[MODEL, Feature.TOKENS]), int(features[HARDWARE, Feature.TOKENS])
        return StepFlops(
            round(tokens * MODEL_FLOPS_PER_TOKEN), round(padded * HARDWARE_FLOPS_PER_TOKEN), tokens, padded
        )


@dataclass(frozen=True)
class FakePeak:
    """The PeakInfo interface."""

    flops: float = PEAK_FLOPS
    device_name: str = "Fake GPU"
    dtype: str = "bf16"
    source: str = "test"


def make_meter(
    clock: FakeClock, *, warmup_steps: int = 0, engine: FakeEngine | None = None, **kwargs
) -> MFUMeter:
    timer = StepTimer(warmup_steps, clock=clock, force_cpu=True)
    kwargs.setdefault("peak", FakePeak())
    return MFUMeter(nn.Linear(2, 2), engine=engine or FakeEngine(), timer=timer, **kwargs)


def run_step(
    meter: MFUMeter, clock: FakeClock, *batches: dict[str, int], seconds: float, wait: float = 0.0
) -> None:
    clock.advance(wait)
    meter.start_step(batches[0] if batches else None)
    for micro_batch in batches[1:]:
        meter.add_batch(micro_batch)
    clock.advance(seconds)
    meter.end_step()


def pretend_two_ranks(monkeypatch: pytest.MonkeyPatch, calls: list, *, other_failed: bool = False) -> None:
    """A process group of two whose other rank did what this one did (or failed), reduced by hand."""

    def sum_and_max(sums: Sequence[float], maxima: Sequence[float]) -> tuple[list[float], list[float]]:
        calls.append(len(sums) + len(maxima))
        other = [0.0] * len(sums) if other_failed else list(sums)
        if other_failed:
            other[-1] = 1.0  # failed_ranks, the last summed field
        return [mine + theirs for mine, theirs in zip(sums, other)], list(maxima)

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "sum_and_max_over_ranks", sum_and_max)


# -- the integrations' fake: FLOPs proportional to tokens on a fake clock ----------------------------
FLOPS_PER_TOKEN = 1e9  # what the fake engine counts per real token (per computed token for hardware FLOPs)
SECONDS_PER_BATCH = 0.25  # what each micro-batch takes on the fake clock


class TokenEngine(CountingEngine):
    """The FlopEngine interface for the integration tests: FLOPs proportional to tokens, no model traced.

    Each micro-batch it counts moves the fake clock on by SECONDS_PER_BATCH, so a step's time is
    known exactly from its micro-batches (and input waits are zero).
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.clock.advance(SECONDS_PER_BATCH)
        mask = batch["attention_mask"]
        features = torch.zeros(2, NUM_FEATURES, dtype=torch.int64)
        features[MODEL, Feature.TOKENS] = int(mask.sum())
        features[HARDWARE, Feature.TOKENS] = mask.numel()
        return features

    def evaluate(self, features: torch.Tensor) -> StepFlops:
        tokens, computed = int(features[MODEL, Feature.TOKENS]), int(features[HARDWARE, Feature.TOKENS])
        return StepFlops(round(tokens * FLOPS_PER_TOKEN), round(computed * FLOPS_PER_TOKEN), tokens, computed)
