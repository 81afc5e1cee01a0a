"""One model of a measurement: the window of steps between two reads, and the run as their sum.

The meter reads a window at each log, combines it over ranks, and adds it to the run totals; the
metrics, the end-of-run summary and the diagnoses are all computed from these two, with the
utilization formula below, written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from . import distributed
from .flops.dtypes import RUN_DTYPE
from .flops.step_flops import StepFlops
from .precision import COMPUTE_DTYPES
from .timer import StepTiming

DTYPE_SLOTS = (RUN_DTYPE, *COMPUTE_DTYPES)
"""The dtypes model and hardware FLOPs are kept apart by (``flops/dtypes.py``), in a fixed order."""
_NO_FLOPS = (0.0,) * len(DTYPE_SLOTS)

PeakFlops = float | Mapping[str, float]
"""One dense peak FLOP/s for every matmul, or one per dtype of ``DTYPE_SLOTS`` that has FLOPs."""


def per_gpu_per_second(amount: float, wall_seconds: float, world_size: int) -> float:
    """``amount`` (FLOPs or tokens, summed over ranks) per GPU per second of wall time."""
    return amount / (wall_seconds * world_size)


def utilization(
    flops: float, wall_seconds: float, world_size: int, peak_flops: PeakFlops, by_dtype: Sequence[float] = ()
) -> float:
    """MFU (model FLOPs) or HFU (hardware FLOPs), after PaLM (Chowdhery et al., 2022), appendix B.

    The FLOP/s a step achieved per GPU over the dense peak FLOP/s of one GPU: ``flops`` are summed
    over all ranks, ``wall_seconds`` is the slowest rank's time (the others wait for it), and
    ``world_size`` GPUs shared the work.

    With one peak per dtype (fp8 linears beside bf16 attention and head), each dtype's FLOPs
    (``by_dtype``, in the order of ``DTYPE_SLOTS``) are judged against its own peak: the seconds the
    matmuls would take at their peaks over the seconds they took, sum_i FLOPs_i / peak_i / (wall x
    GPUs). With one dtype that is the formula above.
    """
    if isinstance(peak_flops, Mapping):
        return sum(
            per_gpu_per_second(amount, wall_seconds, world_size) / peak_flops[dtype]
            for dtype, amount in zip(DTYPE_SLOTS, by_dtype)
            if amount
        )
    return per_gpu_per_second(flops, wall_seconds, world_size) / peak_flops


def dtype_slots(flops: Mapping[str, float]) -> tuple[float, ...]:
    """FLOPs per dtype (``StepFlops.model_by_dtype``) in the order of ``DTYPE_SLOTS``."""
    return tuple(float(flops.get(dtype, 0.0)) for dtype in DTYPE_SLOTS)


@dataclass(frozen=True)
class Window:
    """The measured steps since the last read: of this rank, or of all ranks once combined."""

    world_size: int = 1
    model_flops: float = 0.0
    hardware_flops: float = 0.0
    tokens: float = 0.0
    padded_tokens: float = 0.0
    step_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    meter_seconds: float = 0.0  # the meter's own reads between the steps (part of the wall)
    counting_ranks: float = 0.0  # ranks whose FLOP engine counted batches (1 or 0 for one rank)
    last_model_flops: float = 0.0  # the last step alone
    last_hardware_flops: float = 0.0
    # Step, input wait and the meter's own read time of the slowest rank (the others wait for it).
    wall_seconds: float = 0.0
    steps: float = 0.0
    # Mean step time (without input wait) of the slowest and fastest data-parallel group. Under
    # synchronous data parallelism a group that is late with its batch makes the others wait inside
    # their steps (in the gradient reduction): the spread of step times, not of iteration times,
    # shows it. A group is the ranks that run one batch (a tensor-, context- or pipeline-parallel
    # group; each rank alone otherwise): they wait for each other within the step, so a group's
    # time is its slowest member's, and only groups are compared. A rank without steps has no say.
    step_time_max: float = -math.inf
    step_time_min: float = math.inf
    last_step_seconds: float = 0.0
    # Ranks whose meter failed: they still take part in the reduction, so no rank waits for them.
    failed_ranks: float = 0.0
    # This rank's place in the job (see ``mfu_callbacks.parallelism``): its data-parallel group,
    # named by the group's lowest rank, and how many ranks of that group run the same batch (the
    # tensor-parallel degree), whose tokens are counted once.
    group: int = 0
    batch_replicas: int = 1
    # Where in the run the read happened (``read_place``), the same on every rank that reads at the
    # same point; -inf on a rank that has no say (its meter failed). Checked by the reduction.
    read_at: float = -math.inf
    # The FLOPs above by the dtype their matmuls ran in (``DTYPE_SLOTS``), summed over ranks.
    model_by_dtype: tuple[float, ...] = _NO_FLOPS
    hardware_by_dtype: tuple[float, ...] = _NO_FLOPS
    last_model_by_dtype: tuple[float, ...] = _NO_FLOPS
    last_hardware_by_dtype: tuple[float, ...] = _NO_FLOPS
    # Generation inside the steps (``_generation.py``): its time (inside ``step_seconds``), its model and
    # hardware FLOPs (inside ``model_flops`` and ``hardware_flops``), the tokens it made and the bytes it read.
    generation_seconds: float = 0.0
    generation_model_flops: float = 0.0
    generation_hardware_flops: float = 0.0
    generated_tokens: float = 0.0
    generation_bytes: float = 0.0

    def totals(self) -> dict[str, float]:
        """The sums this window adds to the run (``RunTotals.totals``): what the run summary stores."""
        return _totals(self, self.wall_seconds * self.world_size)


def read_place(steps: int, *, final: bool) -> float:
    """The place of a read: the optimizer steps ended before it, and whether it is the run's last
    (``summary``) or a window's (``metrics``): ranks whose reads differ here are out of step."""
    return 2.0 * steps + (1.0 if final else 0.0)


def rank_window(
    world_size: int,
    timings: Sequence[StepTiming],
    flops: StepFlops | None,
    last_flops: StepFlops | None,
    *,
    group: int = 0,
    batch_replicas: int = 1,
    read_at: float = -math.inf,
    generation_seconds: float = 0.0,
) -> Window:
    """This rank's window from its step timings and the FLOPs of its steps (None: nothing counted);
    ``group``, ``batch_replicas`` and ``read_at`` place it in the job and in the run (``Window``)."""
    steps = sum(timing.steps for timing in timings)
    step_seconds = sum(timing.step_seconds for timing in timings)
    input_wait_seconds = sum(timing.input_wait_seconds for timing in timings)
    wall_seconds = sum(timing.iteration_seconds for timing in timings)  # the meter's reads included
    last = timings[-1] if timings and timings[-1].steps == 1 else None
    counted = flops is not None
    flops, last_flops = flops or StepFlops(0, 0, 0, 0), last_flops or StepFlops(0, 0, 0, 0)
    return Window(
        world_size=world_size,
        model_flops=float(flops.model_flops),
        hardware_flops=float(flops.hardware_flops),
        tokens=float(flops.tokens),
        padded_tokens=float(flops.padded_tokens),
        step_seconds=step_seconds,
        input_wait_seconds=input_wait_seconds,
        meter_seconds=sum(timing.meter_seconds for timing in timings),
        counting_ranks=1.0 if counted else 0.0,
        last_model_flops=float(last_flops.model_flops),
        last_hardware_flops=float(last_flops.hardware_flops),
        wall_seconds=wall_seconds,
        steps=float(steps),
        step_time_max=step_seconds / steps if steps else -math.inf,
        step_time_min=step_seconds / steps if steps else math.inf,
        last_step_seconds=last.iteration_seconds if last is not None else 0.0,
        model_by_dtype=dtype_slots(flops.model_by_dtype),
        hardware_by_dtype=dtype_slots(flops.hardware_by_dtype),
        last_model_by_dtype=dtype_slots(last_flops.model_by_dtype),
        last_hardware_by_dtype=dtype_slots(last_flops.hardware_by_dtype),
        group=group,
        batch_replicas=batch_replicas,
        read_at=read_at,
        generation_seconds=generation_seconds,
    )


# How the fields of a window combine over ranks (world_size is the same on every rank).
_SUMMED_OVER_RANKS = (
    "model_flops",
    "hardware_flops",
    "tokens",
    "padded_tokens",
    "step_seconds",
    "input_wait_seconds",
    "meter_seconds",
    "counting_ranks",
    "last_model_flops",
    "last_hardware_flops",
    "generation_seconds",
    "generation_model_flops",
    "generation_hardware_flops",
    "generated_tokens",
    "generation_bytes",
    "failed_ranks",  # the last (tests that fake another rank's failure set it there)
)
_SUMMED_BY_DTYPE = ("model_by_dtype", "hardware_by_dtype", "last_model_by_dtype", "last_hardware_by_dtype")
_SLOWEST_RANK = ("wall_seconds", "steps", "last_step_seconds")
_ONE_PER_BATCH = ("tokens", "padded_tokens")  # counted by every rank that runs the batch


def combine_ranks(local: Window) -> Window:
    """The window of all ranks: one summing and one maximising all-reduce, the same on every rank.

    The maximum also takes each data-parallel group's step time (a vector with one slot per rank,
    filled by the group's members at the slot of its lowest rank), from which the slowest and the
    fastest group are read. Without a process group the other ``world_size - 1`` ranks are assumed
    to do what this one did.
    """
    if not distributed.is_distributed():
        if local.world_size == 1:
            return local
        assumed: dict[str, Any] = {
            name: getattr(local, name) * local.world_size for name in _SUMMED_OVER_RANKS
        }
        for name in _SUMMED_BY_DTYPE:
            assumed[name] = tuple(value * local.world_size for value in getattr(local, name))
        return replace(local, **assumed)
    return unpack(local, *distributed.sum_and_max_over_ranks(*pack(local)))


def pack(local: Window) -> tuple[list[float], list[float]]:
    """This rank's window as the reduction's two vectors (no collective: it cannot leave a rank behind)."""
    by_dtype = [value for name in _SUMMED_BY_DTYPE for value in getattr(local, name)]
    sums = by_dtype + [
        getattr(local, name) / (local.batch_replicas if name in _ONE_PER_BATCH else 1)
        for name in _SUMMED_OVER_RANKS
    ]
    groups = [-math.inf] * local.world_size
    if math.isfinite(local.step_time_max) and 0 <= local.group < local.world_size:
        groups[local.group] = local.step_time_max
    # The latest and (negated) earliest read of the ranks that have a say: they must be the same.
    places = [local.read_at, -local.read_at] if math.isfinite(local.read_at) else [-math.inf, -math.inf]
    return sums, [getattr(local, name) for name in _SLOWEST_RANK] + places + groups


def unpack(local: Window, sums: list[float], maxima: list[float]) -> Window:
    """The combined window from the reduced vectors; ``ReductionError`` when the ranks read at
    different points (a read called on some ranks only met another read on the others)."""
    slowest, (latest, earliest), group_times = (
        maxima[: len(_SLOWEST_RANK)],
        (maxima[len(_SLOWEST_RANK)], -maxima[len(_SLOWEST_RANK) + 1]),
        maxima[len(_SLOWEST_RANK) + 2 :],
    )
    if math.isfinite(latest) and math.isfinite(earliest) and latest != earliest:
        raise distributed.reads_out_of_step(local.read_at, earliest, latest)
    timed = [seconds for seconds in group_times if math.isfinite(seconds)]
    slots = len(DTYPE_SLOTS)
    by_dtype, sums = sums[: slots * len(_SUMMED_BY_DTYPE)], sums[slots * len(_SUMMED_BY_DTYPE) :]
    combined: dict[str, Any] = {
        **{name: tuple(by_dtype[i * slots : (i + 1) * slots]) for i, name in enumerate(_SUMMED_BY_DTYPE)},
        **dict(zip(_SUMMED_OVER_RANKS, sums)),
        **dict(zip(_SLOWEST_RANK, slowest)),
        "step_time_max": max(timed, default=-math.inf),
        "step_time_min": min(timed, default=math.inf),
    }
    return replace(local, **combined)


# The run summary's totals: enough to recompute every run-level figure of ``metrics.run_summary``.
TOTAL_KEYS = (
    "model_flops",
    "hardware_flops",
    "tokens",
    "padded_tokens",
    "wall_seconds",
    "gpu_seconds",
    "steps",
)


def _totals(source: Window | RunTotals, gpu_seconds: float) -> dict[str, float]:
    values = {key: float(getattr(source, key)) for key in TOTAL_KEYS if key != "gpu_seconds"}
    return {**values, "gpu_seconds": float(gpu_seconds)}


_RUN_SUMMED = (
    "model_flops",
    "hardware_flops",
    "tokens",
    "padded_tokens",
    "step_seconds",
    "input_wait_seconds",
    "meter_seconds",
    "wall_seconds",
    "steps",
)


@dataclass
class RunTotals:
    """The windows read so far, summed; per-rank extremes weighted by the steps of each window."""

    model_flops: float = 0.0
    hardware_flops: float = 0.0
    tokens: float = 0.0
    padded_tokens: float = 0.0
    step_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    meter_seconds: float = 0.0
    wall_seconds: float = 0.0
    steps: float = 0.0
    slowest_rank_seconds: float = 0.0  # sum over windows of (slowest rank's mean step time x steps)
    fastest_rank_seconds: float = 0.0
    world_size: int = 1
    counted: bool = False  # whether any rank's FLOP engine counted a batch
    # Sum over windows of wall seconds x the GPUs of that window: the time base of the run's means,
    # right across a resume with another world size (2 GPUs then 1: each window at its own size).
    gpu_seconds: float = 0.0
    # Model and hardware FLOPs by dtype (``DTYPE_SLOTS``).
    model_by_dtype: list[float] = field(default_factory=lambda: list(_NO_FLOPS))
    hardware_by_dtype: list[float] = field(default_factory=lambda: list(_NO_FLOPS))

    def add(self, window: Window) -> None:
        for name in _RUN_SUMMED:
            setattr(self, name, getattr(self, name) + getattr(window, name))
        for name in ("model_by_dtype", "hardware_by_dtype"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(window, name))])
        self.gpu_seconds += window.wall_seconds * window.world_size
        if math.isfinite(window.step_time_max) and math.isfinite(window.step_time_min):
            self.slowest_rank_seconds += window.step_time_max * window.steps
            self.fastest_rank_seconds += window.step_time_min * window.steps
        self.world_size = window.world_size
        self.counted = self.counted or window.counting_ranks > 0

    @property
    def mean_iteration_seconds(self) -> float:
        """Mean seconds of one step as MFU counts it: the slowest rank's, input wait included; 0 before any."""
        return self.wall_seconds / self.steps if self.steps > 0 else 0.0

    def utilization(
        self, flops: float, peak_flops: PeakFlops | None, by_dtype: Sequence[float] = ()
    ) -> float | None:
        """MFU or HFU of the run (``utilization``), None without a peak."""
        if not peak_flops or self.wall_seconds <= 0:
            return None
        if self.gpu_seconds > 0:
            return utilization(flops, self.gpu_seconds, 1, peak_flops, by_dtype)
        return utilization(flops, self.wall_seconds, self.world_size, peak_flops, by_dtype)

    def model_utilization(self, peak_flops: PeakFlops | None) -> float | None:
        """MFU of the run, None without a peak."""
        return self.utilization(self.model_flops, peak_flops, self.model_by_dtype)

    def hardware_utilization(self, peak_flops: PeakFlops | None) -> float | None:
        """HFU of the run, None without a peak."""
        return self.utilization(self.hardware_flops, peak_flops, self.hardware_by_dtype)

    def per_gpu_per_second(self, amount: float) -> float:
        """``amount`` (FLOPs or tokens, summed over ranks) per GPU-second of the run's windows."""
        if self.gpu_seconds > 0:
            return amount / self.gpu_seconds
        return per_gpu_per_second(amount, self.wall_seconds, self.world_size)

    def totals(self) -> dict[str, float]:
        """The sums every run-level figure divides (MFU = model_flops / gpu_seconds / peak, as the
        report computes it): what the run summary stores, so that ``compare`` divides the same."""
        return _totals(self, self.gpu_seconds)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RunTotals:
        """The totals saved by ``state_dict``; a value of the wrong type raises ``ValueError``."""
        known = {spec.name: spec for spec in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in state.items():
            if key not in known:
                continue
            if key in ("model_by_dtype", "hardware_by_dtype"):
                values[key] = _flops_by_dtype(key, value)
                continue
            if isinstance(value, bool) != (key == "counted") or not isinstance(value, (int, float)):
                raise ValueError(f"run totals: {key} is {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"run totals: {key} is {value!r}")
            values[key] = value
        totals = cls(**values)
        if "gpu_seconds" not in state:  # saved before gpu_seconds: every window at the last size
            totals.gpu_seconds = totals.wall_seconds * totals.world_size
        for name, total in (
            ("model_by_dtype", totals.model_flops),
            ("hardware_by_dtype", totals.hardware_flops),
        ):
            if name not in state:  # saved before FLOPs were kept by dtype: all in the run's dtype
                getattr(totals, name)[DTYPE_SLOTS.index(RUN_DTYPE)] = total
        return totals


def _flops_by_dtype(key: str, value: Any) -> list[float]:
    """A saved list of FLOPs per dtype slot; ``ValueError`` for anything else."""
    if (
        not isinstance(value, list)
        or len(value) != len(DTYPE_SLOTS)
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in value
        )
    ):
        raise ValueError(f"run totals: {key} is {value!r}")
    return [float(v) for v in value]
