"""Where a profiled step's time went: kernels on a timeline, split into buckets that add up to the step.

Input: the kernels of a few profiled steps (start, end, what they are), the span those steps took,
and the intervals the host spent between steps. A sweep over the timeline gives every instant of
the span to exactly one bucket, so the buckets sum to the measured time by construction:

- a kernel of compute running: its bucket (matmuls by model component, attention kernels,
  elementwise and normalization, the optimizer, memory copies); overlapping kernels share the instant;
- only communication running: exposed communication (communication under compute is overlapped,
  reported beside the sum, not in it);
- nothing running: the GPU idled, waiting for input when the host was between steps, else for the host.

Then the advice: for each bucket, what MFU would be if it ran at the rate of the step's best matmul
(matmuls and attention), or took no time (everything else: an upper bound), best first.
Knows no profiler and no framework: ``_profiled_steps.py`` turns a ``torch.profiler`` trace into this input.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._atomic import write_json
from ._window import utilization

FILE_NAME = "mfu_profile.json"

MATMUL = "matmul"
ATTENTION = "attention kernels"
ELEMENTWISE = "elementwise & normalization"
OPTIMIZER = "optimizer"
MEMORY = "memory copies"
COMMUNICATION = "communication (exposed)"
HOST_GAPS = "GPU idle: waiting for the host"
INPUT_WAIT = "GPU idle: input wait between steps"
_IDLE = (HOST_GAPS, INPUT_WAIT)
_MATMUL_PREFIX = MATMUL + ": "  # matmul buckets are named by component: "matmul: mlp"

# Matmuls are compared with the best one only where they take a visible share of the step.
_BEST_RATE_MIN_SHARE = 0.01
# Kernels may run this much longer than the measured step before the calibration says so.
_BUSY_TOLERANCE = 0.05
# The change that recovers a bucket's time, by bucket (matmul components are handled in ``_advice``).
_CHANGES: Mapping[str, str] = {
    ATTENTION: "a fused attention kernel (attn_implementation='sdpa' or 'flash_attention_2') and packed sequences",
    ELEMENTWISE: "fused kernels: torch.compile the model, or Liger Kernel's fused RMSNorm, SwiGLU and cross-entropy",
    OPTIMIZER: "a fused optimizer: torch.optim.AdamW(..., fused=True) (HF: optim='adamw_torch_fused')",
    MEMORY: "no host-device copies inside the step: pin_memory=True with non_blocking copies, tensors kept on the GPU",
    COMMUNICATION: "overlap communication with compute: larger micro-batches or gradient accumulation, FSDP prefetching",
    HOST_GAPS: "keep the GPU fed: larger micro-batches, torch.compile (mode='reduce-overhead' for CUDA graphs), "
    "no host syncs (.item(), printing tensors) inside the step",
    INPUT_WAIT: "feed the GPU faster: DataLoader num_workers, pin_memory=True, persistent_workers=True, "
    "tokenize ahead of time",
}
_MATMUL_CHANGES: Mapping[str, str] = {
    "head": "a larger micro-batch (more tokens per matmul)",
    "adapters": "a larger micro-batch, or adapters on fewer modules (their small matmuls run far below peak)",
    "experts": "grouped matmuls for the experts (MegaBlocks, or torch's grouped matmul) and a larger micro-batch",
    "router": "a larger micro-batch",
}
_DEFAULT_MATMUL_CHANGE = "a larger micro-batch or longer sequences (larger matmuls run closer to peak)"


@dataclass(frozen=True)
class Kernel:
    """One kernel of the profiled steps: when it ran (seconds, the trace's clock) and what it was.

    kind: one of the compute kinds above, or "communication". component: for matmuls, the model
    component it belongs to (``flops/components.py`` names). flops: what it computed (matmuls), else 0.
    dims: the matmul's sizes (m, n, k), to spot sizes off the tensor cores' multiples.
    """

    start: float
    end: float
    kind: str
    component: str | None = None
    flops: float = 0.0
    dims: tuple[int, ...] = ()


@dataclass(frozen=True)
class Bucket:
    """A share of the mean profiled step: seconds per step; for matmuls their FLOPs and rate."""

    name: str
    seconds: float
    flops: float = 0.0  # computed by these kernels per step (matmuls)
    model_flops: float | None = None  # the model FLOPs of this component per step, from the FLOP engine

    @property
    def component(self) -> str | None:
        """The model component of a matmul bucket (the inverse of ``bucket_name``); None for the others."""
        return self.name[len(_MATMUL_PREFIX) :] if self.name.startswith(_MATMUL_PREFIX) else None

    @property
    def tflops(self) -> float | None:
        """Achieved TFLOP/s of the kernels in this bucket (matmuls)."""
        return self.flops / self.seconds / 1e12 if self.flops and self.seconds > 0 else None


@dataclass(frozen=True)
class Advice:
    """What one bucket costs: MFU if it ran at the best matmul's rate (or took no time), and the fix."""

    bucket: str
    mfu_if_fixed: float
    mfu_gain: float  # mfu_if_fixed - mfu, a fraction like mfu
    change: str
    upper_bound: bool  # True where busy work was taken to vanish (no rate to compare it with)


@dataclass(frozen=True)
class Breakdown:
    """The mean profiled step's time by bucket; ``buckets`` sum to ``step_seconds``.

    As profiled, ``step_seconds`` is the profiled steps' span over their number. Once calibrated
    against the measured (unprofiled) step (``calibrated``), the kernels keep their profiled times and
    the GPU's idle time is what the measured step leaves: a profiler slows the host, hardly the kernels.
    """

    steps: int
    step_seconds: float
    buckets: tuple[Bucket, ...]
    overlapped_communication: float  # seconds per step of communication hidden under compute
    best_matmul_tflops: float | None
    profiled_step_seconds: float  # the profiled steps' own mean wall time
    mfu: float | None = None  # model FLOPs / (step_seconds x peak)
    measured_step_seconds: float | None = None  # the meter's mean step (unprofiled steps)
    advice: tuple[Advice, ...] = ()
    notes: tuple[str, ...] = ()
    model_flops: Mapping[str, float] = field(default_factory=dict)  # per step, by component
    peak_flops: float | None = None
    misaligned: Mapping[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # sizes off the multiple, per bucket
    alignment: int = 8  # the multiple matmul sizes should have on this GPU and dtype

    @property
    def busy_seconds(self) -> float:
        """Seconds per step the device ran something (every bucket but the idle ones)."""
        return sum(b.seconds for b in self.buckets if b.name not in _IDLE)

    @property
    def total_seconds(self) -> float:
        return sum(bucket.seconds for bucket in self.buckets)

    def matmul_buckets(self) -> dict[str, Bucket]:
        """Matmul buckets by component name."""
        return {b.component: b for b in self.buckets if b.component is not None}

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and W&B."""
        return {
            "profiled_steps": self.steps,
            "step_seconds": self.step_seconds,
            "profiled_step_seconds": self.profiled_step_seconds,
            "busy_seconds": self.busy_seconds,
            "measured_step_seconds": self.measured_step_seconds,
            "sum_of_buckets_seconds": self.total_seconds,
            "mfu_of_profiled_steps": self.mfu,
            "best_matmul_tflops": self.best_matmul_tflops,
            "overlapped_communication_seconds": self.overlapped_communication,
            "buckets": [
                {
                    "name": b.name,
                    "seconds": b.seconds,
                    "share": b.seconds / self.step_seconds if self.step_seconds else 0.0,
                    "tflops": b.tflops,
                    "flops": b.flops or None,
                    "model_flops": b.model_flops,
                }
                for b in self.buckets
            ],
            "advice": [
                {
                    "bucket": a.bucket,
                    "mfu_if_fixed": a.mfu_if_fixed,
                    "mfu_gain": a.mfu_gain,
                    "change": a.change,
                    "upper_bound": a.upper_bound,
                }
                for a in self.advice
            ],
            "notes": list(self.notes),
        }


def bucket_name(kernel: Kernel) -> str:
    """The bucket a kernel's time goes to: matmuls by component, everything else by kind."""
    if kernel.kind == MATMUL:
        return _MATMUL_PREFIX + (kernel.component or "other")
    return kernel.kind


def attribute(
    kernels: Iterable[Kernel],
    span: tuple[float, float],
    steps: int,
    between_steps: Sequence[tuple[float, float]] = (),
) -> tuple[dict[str, float], dict[str, float], float]:
    """Seconds of the span per bucket (summing to the span), FLOPs per matmul bucket, and the seconds of
    communication overlapped by compute; all per step (divided by ``steps``)."""
    begin, end = span
    boundaries: list[tuple[float, int, int, str]] = []  # (time, order, +1/-1, key); ends sort first
    flops: dict[str, float] = {}
    for kernel in kernels:
        start, stop = max(kernel.start, begin), min(kernel.end, end)
        if stop <= start:
            continue
        key = "communication" if kernel.kind == "communication" else bucket_name(kernel)
        boundaries.append((start, 1, +1, key))
        boundaries.append((stop, 0, -1, key))
        if kernel.kind == MATMUL:
            flops[key] = flops.get(key, 0.0) + kernel.flops
    for start, stop in between_steps:
        start, stop = max(start, begin), min(stop, end)
        if stop > start:
            boundaries.append((start, 1, +1, "@between"))
            boundaries.append((stop, 0, -1, "@between"))
    boundaries.sort()
    seconds: dict[str, float] = {}
    active: Counter[str] = Counter()
    overlapped = 0.0
    previous = begin
    for time, _, change, key in [*boundaries, (end, 0, 0, "")]:
        if time > previous:
            _share(seconds, active, time - previous)
            if active["communication"] and _computing(active):
                overlapped += time - previous
            previous = time
        if change:
            active[key] += change
    per_step = 1.0 / steps
    return (
        {key: value * per_step for key, value in seconds.items() if value > 0},
        {key: value * per_step for key, value in flops.items()},
        overlapped * per_step,
    )


def _computing(active: Counter[str]) -> int:
    return sum(count for key, count in active.items() if key not in ("communication", "@between"))


def _share(seconds: dict[str, float], active: Counter[str], duration: float) -> None:
    """Give ``duration`` to what ran: compute kernels evenly, else exposed communication, else idle."""
    running = _computing(active)
    if running:
        for key, count in active.items():
            if count and key not in ("communication", "@between"):
                seconds[key] = seconds.get(key, 0.0) + duration * count / running
    elif active["communication"]:
        seconds[COMMUNICATION] = seconds.get(COMMUNICATION, 0.0) + duration
    elif active["@between"]:
        seconds[INPUT_WAIT] = seconds.get(INPUT_WAIT, 0.0) + duration
    else:
        seconds[HOST_GAPS] = seconds.get(HOST_GAPS, 0.0) + duration


def breakdown(
    kernels: Sequence[Kernel],
    span: tuple[float, float],
    steps: int,
    between_steps: Sequence[tuple[float, float]] = (),
    *,
    model_flops: Mapping[str, float] | None = None,
    peak_flops: float | None = None,
    alignment: int = 8,
) -> Breakdown:
    """The breakdown of ``steps`` profiled steps that took ``span`` (see ``attribute``), as profiled.

    model_flops: the model FLOPs per step by component (the FLOP engine's breakdown); with
    ``peak_flops`` they give MFU and the advice. ``alignment``: the multiple the matmul sizes should
    have on this GPU and dtype (a bucket with a size off it is advised to pad it).
    """
    if steps < 1:
        raise ValueError(f"a breakdown needs at least one profiled step, got {steps}")
    seconds, flops, overlapped = attribute(kernels, span, steps, between_steps)
    step = (span[1] - span[0]) / steps
    model_flops = dict(model_flops or {})
    buckets = []
    for name, value in seconds.items():
        bucket = Bucket(name, value)
        if bucket.component is not None:
            bucket = Bucket(name, value, flops.get(name, 0.0), model_flops.get(bucket.component))
        buckets.append(bucket)
    misaligned = {name: tuple(sorted(sizes)) for name, sizes in _misaligned_sizes(kernels, alignment).items()}
    return _judged(
        Breakdown(
            steps=steps,
            step_seconds=step,
            buckets=tuple(buckets),
            overlapped_communication=overlapped,
            best_matmul_tflops=None,
            profiled_step_seconds=step,
            model_flops=model_flops,
            peak_flops=peak_flops,
            misaligned=misaligned,
            alignment=alignment,
        )
    )


def calibrated(result: Breakdown, measured_step_seconds: float) -> Breakdown:
    """The breakdown of the measured (unprofiled) step: the kernels' times as profiled, the GPU's idle
    time what the measured step leaves, split as the profile split it (all to host gaps if it had none).

    A profiler costs the host time per operator, which shows as extra idle GPU time wherever the host
    is the bottleneck; kernel times are hardly touched. Kernels longer than the measured step (a
    larger batch in the profiled steps, or a device slowed by the profiler) keep their times, and a
    note says so.
    """
    busy = result.busy_seconds
    idle = {b.name: b.seconds for b in result.buckets if b.name in _IDLE}
    profiled_idle = sum(idle.values())
    left = max(measured_step_seconds - busy, 0.0)
    shares = (
        {name: value / profiled_idle for name, value in idle.items()} if profiled_idle else {HOST_GAPS: 1.0}
    )
    buckets = [b for b in result.buckets if b.name not in _IDLE]
    buckets += [Bucket(name, left * share) for name, share in shares.items() if left * share > 0]
    notes = list(result.notes)
    if busy > measured_step_seconds * (1 + _BUSY_TOLERANCE):
        notes.append(
            f"the profiled steps' kernels took {1e3 * busy:.2f} ms, {busy / measured_step_seconds - 1:.1%} more "
            f"than the measured step ({1e3 * measured_step_seconds:.2f} ms): their batches or the device differed"
        )
    elif profiled_idle > left:
        notes.append(
            f"under the profiler the GPU idled {1e3 * (profiled_idle - left):.2f} ms more per step "
            "(the profiler's own host time); idle time is the measured step less the kernels' time"
        )
    return _judged(
        replace(
            result,
            step_seconds=busy + left,
            buckets=tuple(buckets),
            measured_step_seconds=measured_step_seconds,
            notes=tuple(notes),
        )
    )


def _judged(result: Breakdown) -> Breakdown:
    """The breakdown with buckets in order of time, its best matmul rate, MFU and ranked advice."""
    buckets = tuple(sorted(result.buckets, key=lambda b: -b.seconds))
    step = result.step_seconds
    best = _best_rate(buckets, step)
    total_model = sum(result.model_flops.values())
    peak = result.peak_flops
    mfu = utilization(total_model, step, 1, peak) if total_model and peak and step > 0 else None
    judged = replace(
        result, buckets=buckets, best_matmul_tflops=best / 1e12 if best else None, mfu=mfu, advice=()
    )
    if mfu is None or not best or not peak:
        return judged
    advice = [
        _advice(b, step, total_model, peak, best, result.model_flops, result.misaligned, result.alignment)
        for b in buckets
    ]
    found = [a for a in advice if a is not None and a.mfu_gain > 0]
    # Estimates from a measured rate (and idle time, which can vanish) first; then the upper bounds
    # of busy work with no rate to compare with (elementwise kernels, the optimizer, ...).
    ranked = sorted(found, key=lambda a: (a.upper_bound, -a.mfu_gain))
    return replace(judged, advice=tuple(ranked))


def _best_rate(buckets: Sequence[Bucket], step: float) -> float:
    """FLOP/s of the fastest matmul bucket that holds a visible share of the step."""
    rates = [
        b.flops / b.seconds
        for b in buckets
        if b.component is not None and b.flops and b.seconds >= _BEST_RATE_MIN_SHARE * step
    ]
    return max(rates, default=0.0)


def _misaligned_sizes(kernels: Iterable[Kernel], alignment: int) -> dict[str, set[int]]:
    """Per matmul bucket, the matmul sizes that are not multiples of ``alignment``."""
    sizes: dict[str, set[int]] = {}
    for kernel in kernels:
        if kernel.kind == MATMUL:
            off = {dim for dim in kernel.dims if dim % alignment}
            if off:
                sizes.setdefault(bucket_name(kernel), set()).update(off)
    return sizes


def _advice(
    bucket: Bucket,
    step: float,
    model_flops: float,
    peak: float,
    best: float,
    by_component: Mapping[str, float],
    misaligned: Mapping[str, tuple[int, ...]],
    alignment: int,
) -> Advice | None:
    """MFU with this bucket at the best matmul's rate (matmuls, attention) or gone (the rest)."""
    component = bucket.component
    if component is not None:
        work = bucket.flops
        off = list(misaligned.get(bucket.name, ()))
        if off:
            sizes = ", ".join(f"{size:,}" for size in off[:3])
            change = (
                f"pad the sizes {sizes} to multiples of {alignment} (a vocabulary: "
                f"pad_to_multiple_of={alignment}; 64 suits every GPU)"
            )
        else:
            change = _MATMUL_CHANGES.get(component, _DEFAULT_MATMUL_CHANGE)
        upper = False
    elif bucket.name == ATTENTION:
        work = by_component.get("attention_scores", 0.0)
        change, upper = _CHANGES[ATTENTION], not work
    elif bucket.name in _CHANGES:  # idle time can vanish; busy work has no rate to judge it by
        work, change, upper = 0.0, _CHANGES[bucket.name], bucket.name not in _IDLE
    else:
        return None
    faster = work / best if work else 0.0
    if faster >= bucket.seconds:
        return None
    step_if_fixed = step - bucket.seconds + faster
    mfu = utilization(model_flops, step, 1, peak)  # the breakdown is one GPU's
    fixed = utilization(model_flops, step_if_fixed, 1, peak)
    return Advice(bucket.name, fixed, fixed - mfu, change, upper)


def format_breakdown(result: Breakdown, top: int = 3) -> str:
    """The breakdown as a few lines of text, for the end-of-run report."""
    lines = [
        f"Where the step time goes ({result.steps} profiled steps; {1e3 * result.step_seconds:.2f} ms per step):"
    ]
    for bucket in result.buckets:
        share = bucket.seconds / result.step_seconds if result.step_seconds else 0.0
        rate = f"  {bucket.tflops:7.1f} TFLOP/s" if bucket.tflops is not None else ""
        lines.append(f"  {bucket.name:40} {1e3 * bucket.seconds:9.3f} ms {share:7.1%}{rate}")
    lines.append(f"  {'sum':40} {1e3 * result.total_seconds:9.3f} ms")
    if result.overlapped_communication:
        lines.append(f"  communication overlapped by compute: {1e3 * result.overlapped_communication:.3f} ms")
    if result.measured_step_seconds:
        lines.append(
            f"  measured step (without the profiler) {1e3 * result.measured_step_seconds:.3f} ms; "
            f"profiled step {1e3 * result.profiled_step_seconds:.3f} ms; kernels {1e3 * result.busy_seconds:.3f} ms"
        )
    if result.advice:
        lines.append("What would raise MFU most:")
        for advice in result.advice[:top]:
            bound = ", if it took no time" if advice.upper_bound else ""
            lines.append(
                f"  {advice.bucket}: MFU {advice.mfu_if_fixed:.1%} (+{advice.mfu_gain:.1%}{bound}): {advice.change}"
            )
    lines.extend(f"  note: {note}" for note in result.notes)
    return "\n".join(lines)


def write_breakdown(result: Breakdown, folder: str | os.PathLike[str]) -> Path:
    """Write the breakdown as ``mfu_profile.json`` in ``folder`` (beside the run summary), atomically."""
    return write_json(Path(folder) / FILE_NAME, result.as_dict())
