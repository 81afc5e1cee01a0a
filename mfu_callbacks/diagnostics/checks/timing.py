"""The timing checks: time in which the GPU computes nothing (input wait), waits for another rank
(stragglers) or computes at a lowered clock."""

from __future__ import annotations

from ..clocks import SM_CLOCK_THRESHOLD
from ..review import Diagnosis, Review, cost_text, recovered

INPUT_WAIT_THRESHOLD = 0.05  # input wait share of iteration time over the run
STRAGGLER_THRESHOLD = 0.10  # slowest rank's mean step time above the fastest's, relative
LOW_CLOCK_READS = 2  # throttled reads needed before reporting (one read can catch a transient dip)
MIN_TIMED_STEPS = 10  # measured steps before the timing checks (input wait, stragglers) judge a run


def input_bound(review: Review) -> Diagnosis | None:
    """Time the GPU waits for the next batch is time it computes nothing."""
    run = review.run
    iteration = run.step_seconds + run.input_wait_seconds + run.meter_seconds
    if run.steps < MIN_TIMED_STEPS or iteration <= 0:
        return None
    waiting = run.input_wait_seconds / iteration
    if waiting <= INPUT_WAIT_THRESHOLD:
        return None
    cost = recovered(review.mfu, waiting)
    return Diagnosis(
        "input_bound",
        f"waiting for input took {waiting:.1%} of iteration time{cost_text(review.mfu, cost)}; feed the GPU faster: "
        "DataLoader num_workers (a few per GPU), pin_memory=True, persistent_workers=True, prefetch_factor=2-4 "
        "(HF TrainingArguments: dataloader_num_workers, dataloader_pin_memory, dataloader_persistent_workers, "
        "dataloader_prefetch_factor), and tokenize ahead of time",
        value=waiting,
        threshold=INPUT_WAIT_THRESHOLD,
        mfu_cost=cost,
    )


def stragglers(review: Review) -> Diagnosis | None:
    """Every rank waits for the slowest one at each gradient reduction.

    Under model parallelism the ranks that share a batch wait for each other inside every step, so
    the step times compared are those of data-parallel groups (a group's is its slowest member's):
    one rank, without model parallelism.
    """
    run = review.run
    if run.world_size < 2 or run.steps < MIN_TIMED_STEPS or run.fastest_rank_seconds <= 0:
        return None
    slowest, fastest = run.slowest_rank_seconds / run.steps, run.fastest_rank_seconds / run.steps
    excess = slowest / fastest - 1.0
    if excess <= STRAGGLER_THRESHOLD:
        return None
    mfu = review.mfu
    cost = mfu * excess if mfu is not None else None  # every rank at the fastest rank's pace
    cost_text = (
        f": MFU {mfu:.1%} would be up to {mfu + cost:.1%} at the fastest's pace"
        if mfu is not None and cost is not None
        else ""
    )
    return Diagnosis(
        "stragglers",
        f"the slowest rank's mean step ({slowest:.3f} s; under model parallelism, the slowest data-parallel "
        f"group's) is {excess:.1%} above the fastest's ({fastest:.3f} s)"
        f"{cost_text}; the others wait for it: look for uneven batches (sort or bucket by length), a throttled "
        "or shared GPU, or host contention on its node",
        value=excess,
        threshold=STRAGGLER_THRESHOLD,
        mfu_cost=cost,
        details={"slowest_step_seconds": slowest, "fastest_step_seconds": fastest},
    )


def gpu_clocks(review: Review) -> Diagnosis | None:
    """An SM clock well below its maximum (thermal or power limits) slows every matmul alike."""
    clocks = review.clocks
    if len(clocks.low_ratios) < LOW_CLOCK_READS:
        return None
    mean_ratio = sum(clocks.low_ratios) / len(clocks.low_ratios)
    mfu = review.mfu
    cost = mfu * (1.0 / mean_ratio - 1.0) if mfu is not None else None  # matmul time scales with 1 / clock
    why = f" ({', '.join(sorted(clocks.low_reasons))})" if clocks.low_reasons else ""
    cost_text = (
        f": MFU {mfu:.1%} would be up to {mfu + cost:.1%} at full clock"
        if mfu is not None and cost is not None
        else ""
    )
    return Diagnosis(
        "gpu_clocks",
        f"SM clock averaged {mean_ratio:.0%} of its {clocks.max_mhz:,.0f} MHz maximum at {len(clocks.low_ratios)} "
        f"of {clocks.reads} log-time reads{why}{cost_text}; check cooling, the power limit and clock settings "
        "(nvidia-smi -q -d PERFORMANCE,CLOCK)",
        value=mean_ratio,
        threshold=SM_CLOCK_THRESHOLD,
        mfu_cost=cost,
        details={"sm_clock_mhz": mean_ratio * clocks.max_mhz, "max_sm_clock_mhz": clocks.max_mhz},
    )
