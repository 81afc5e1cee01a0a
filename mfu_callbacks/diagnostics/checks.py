"""The checks, one function each, registered under their id in the order they run.

Each takes a :class:`Review` (what the meter holds at a read) and returns a :class:`Diagnosis` or
None. Costs are estimates: a step's time is taken to scale with the FLOPs it computes, so removing a
share ``s`` of the computed FLOPs (padding, recompute) or of the iteration time (input wait) would
raise MFU by ``mfu * s / (1 - s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import torch
from torch import nn

from .._window import PeakFlops, RunTotals
from ..flops.components import ATTENTION_SCORES, HEAD, classify
from ..flops.features import MODEL
from . import alignment
from .alignment import Cost
from .clocks import SM_CLOCK_THRESHOLD, ClockLog
from .measured import MatmulTime
from .model_shapes import Linear, ModelShapes
from .slowdowns import IN_FEATURES, OUT_FEATURES

# -- thresholds ------------------------------------------------------------------------------------
PADDING_THRESHOLD = 0.10  # padding share of computed tokens over the run
INPUT_WAIT_THRESHOLD = 0.05  # input wait share of iteration time over the run
STRAGGLER_THRESHOLD = 0.10  # slowest rank's mean step time above the fastest's, relative
RECOMPUTE_THRESHOLD = 0.01  # recompute share of hardware FLOPs from which checkpointing counts as on
SHAPE_FLOPS_THRESHOLD = 0.01  # FLOP share of misaligned matmuls worth reporting (a 2-label classifier is not)
# Old ids of renamed checks: silencing by the old id still works (with a FutureWarning naming the new one).
RENAMED: Mapping[str, str] = {
    "vocab_not_multiple_of_64": "vocab_alignment",
    "matmul_shapes": "matmul_alignment",
}
LOW_CLOCK_READS = 2  # throttled reads needed before reporting (one read can catch a transient dip)
MIN_TIMED_STEPS = 10  # measured steps before the timing checks (input wait, stragglers) judge a run
# Tensor cores want matmul sizes in multiples of 16 bytes of the operand dtype (NVIDIA's "Matrix
# Multiplication Background" guide). FP32 matmuls (without TF32) do not run on tensor cores, so
# their shapes are not checked. What a size off it costs is measured (alignment.py), not assumed.
MATMUL_ALIGNMENT: Mapping[str, int] = {"bf16": 8, "fp16": 8, "fp8": 16, "tf32": 4}
# Step time of fp32 adapters over bf16 adapters on a bf16 base, measured on a GPU by
# benchmarks/bench_fp32_adapters.py. The diagnosis stays off until it is measured.
# H100 SXM, LoRA r=16 on all linear layers of a 1.1 B Llama-style model, batch 4 x 2048, bf16 base:
# 200.0 ms with fp32 adapters against 134.3 ms with bf16 adapters (benchmarks/RESULTS.md).
FP32_ADAPTER_SLOWDOWN: float | None = 1.489
FP32_ADAPTER_MIN_SLOWDOWN = 1.02  # below this the measured cost is within timing noise: never reported


@dataclass(frozen=True)
class Diagnosis:
    """One cause of lost MFU, found in this run.

    id: stable, for silencing and for W&B summary keys. message: one line with the number that
    triggered it and the fix. value: that number; threshold: the limit it crossed. mfu_cost: how
    much higher MFU (a fraction, like ``mfu``) would be without the cause, an estimate; None where
    it cannot be estimated. flops_share: share of the step's model FLOPs concerned, where it applies.
    details: further numbers behind the message, by name.
    """

    id: str
    message: str
    value: float
    threshold: float
    mfu_cost: float | None = None
    flops_share: float | None = None
    details: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.id}] {self.message}"


@dataclass(frozen=True)
class FlopSplit:
    """The run's FLOPs (this rank's features) and the shares of its hardware FLOPs that are waste."""

    model_flops: float
    breakdown: Mapping[str, float]
    padding_share: float  # of hardware FLOPs: computed on padding tokens
    recompute_share: float  # of hardware FLOPs: rerun by activation checkpointing


@dataclass
class Review:
    """What the checks read at one read of the meter (host-side numbers only)."""

    run: RunTotals
    model: nn.Module
    split: FlopSplit | None
    peak_flops: PeakFlops | None  # one peak, or one per dtype the matmuls ran in
    compute_dtype: str | None
    autocast_in_training: bool | None  # None when no forward was seen
    clocks: ClockLog
    read_model_shapes: Callable[[], ModelShapes]
    device_name: str | None = None  # as torch names the GPU: picks the rows of the slowdown table
    # Matmul times per component measured in the run (a profile window); None where none ran.
    measured_matmuls: Mapping[str, MatmulTime] | None = None
    # A profile window is still to run: the alignment checks wait for its measurement.
    profile_pending: bool = False

    @cached_property
    def mfu(self) -> float | None:
        return self.run.model_utilization(self.peak_flops)

    @property
    def shapes(self) -> ModelShapes:
        return self.read_model_shapes()

    @property
    def step_seconds(self) -> float:
        """Mean seconds of one step as MFU counts it (the slowest rank's, input wait included)."""
        return self.run.mean_iteration_seconds

    def share_of_model_flops(self, component: str) -> float:
        split = self.split
        return (
            split.breakdown.get(component, 0.0) / split.model_flops
            if split is not None and split.model_flops
            else 0.0
        )


Check = Callable[[Review], "Diagnosis | None"]
CHECKS: dict[str, Check] = {}


def check(diagnosis_id: str) -> Callable[[Check], Check]:
    """Register a check under its diagnosis id (the order of registration is the order of running)."""

    def register(function: Check) -> Check:
        CHECKS[diagnosis_id] = function
        return function

    return register


# -- the checks --------------------------------------------------------------------------------------
@check("vocab_alignment")
def vocab_alignment(review: Review) -> Diagnosis | None:
    """An LM head whose vocabulary is off the tensor cores' alignment, where a measurement says it costs time.

    Cost: the head's time x (1 - 1 / slowdown) as a share of the step. The slowdown and the head's
    time come from the run's own matmul times where a profile window measured them, else from the
    table of measured slowdowns for this GPU family and dtype. Without either, a size off the
    dtype's alignment is reported with no cost, and one that meets it is not reported.
    """
    if review.profile_pending:
        return None  # judged once the profile window has measured the head
    split, shapes = review.split, review.shapes
    head_share = review.share_of_model_flops(HEAD)
    head = next((linear for linear in shapes.linears if linear.is_head), None)
    if split is None or head_share <= 0:
        return None  # no head matmul over the vocabulary: an embedding lookup costs no FLOPs
    vocab = head.out_features if head is not None else shapes.vocab_sizes[-1]
    tile = MATMUL_ALIGNMENT.get(review.compute_dtype or "")
    if not vocab % 64 or tile is None:
        return None  # aligned, or no tensor cores at this dtype (fp32 without TF32)
    hidden = head.in_features if head is not None else 0
    # The run's own head time says how slow the head is, not why: it is read as the cost of
    # alignment only for a size off the dtype's tile (a small matmul is slow for other reasons).
    in_run = alignment.from_run(review.measured_matmuls, HEAD, review.step_seconds) if vocab % tile else None
    cost = in_run or alignment.from_table(
        review.device_name,
        review.compute_dtype,
        vocab,
        OUT_FEATURES,
        hidden,
        head_share * split.model_flops,
        review.run.wall_seconds,
    )
    if cost is None and not vocab % tile:
        return None  # nothing measured, and the size meets the dtype's alignment (or no tensor cores)
    if cost is not None and cost.time_share == 0.0:
        return None  # measured: no cost at this size
    multiple = alignment.padding_multiple(review.device_name, review.compute_dtype)
    padded = _round_up(vocab, multiple)
    fix = (
        f"pad it to {padded:,} (model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of={multiple}))"
    )
    what = f"vocabulary size {vocab:,} is not a multiple of {tile if tile and vocab % tile else 64}"
    head_text = f"the LM head ({head_share:.1%} of the step's FLOPs)"
    details = {"padded_vocab_size": float(padded), "head_flops_share": head_share}
    if cost is None:
        return Diagnosis(
            "vocab_alignment",
            f"{what}: {head_text} runs on misaligned tensor-core tiles; no slowdown was measured for "
            f"{review.device_name or 'this GPU'} at {review.compute_dtype}, so no cost is claimed "
            f"(mfu-callbacks doctor times it on this GPU); {fix}",
            value=float(vocab),
            threshold=float(multiple),
            flops_share=head_share,
            details=details,
        )
    mfu_cost = _recovered(review.mfu, cost.time_share) if cost.time_share is not None else None
    details.update(slowdown=cost.slowdown, measured_in_run=float(cost.in_run))
    if cost.time_share is not None:
        details["time_share"] = cost.time_share
    time_text = (
        f", costing about {cost.time_share:.1%} of the step's time" if cost.time_share is not None else ""
    )
    return Diagnosis(
        "vocab_alignment",
        f"{what}: {head_text} runs {_slowdown_text(cost)}{time_text}{_cost_text(review.mfu, mfu_cost)}; {fix}",
        value=float(vocab),
        threshold=float(multiple),
        mfu_cost=mfu_cost,
        flops_share=head_share,
        details=details,
    )


@check("padding_waste")
def padding_waste(review: Review) -> Diagnosis | None:
    """Padding tokens are computed and thrown away; packing sequences removes them."""
    run = review.run
    if run.padded_tokens <= 0:
        return None
    padding = 1.0 - run.tokens / run.padded_tokens
    if padding <= PADDING_THRESHOLD:
        return None
    # Attention is quadratic in length, so the FLOP share of padding differs from its token share.
    wasted = review.split.padding_share if review.split is not None else padding
    cost = _recovered(review.mfu, wasted)
    return Diagnosis(
        "padding_waste",
        f"padding is {padding:.1%} of computed tokens ({wasted:.1%} of computed FLOPs){_cost_text(review.mfu, cost)}; "
        "pack sequences: HF Trainer DataCollatorWithFlattening (with flash attention), TRL "
        "SFTConfig(packing=True), Lightning or a plain loop: pack in the dataset or collate_fn",
        value=padding,
        threshold=PADDING_THRESHOLD,
        mfu_cost=cost,
        details={"padding_flops_share": wasted},
    )


@check("input_bound")
def input_bound(review: Review) -> Diagnosis | None:
    """Time the GPU waits for the next batch is time it computes nothing."""
    run = review.run
    iteration = run.step_seconds + run.input_wait_seconds + run.meter_seconds
    if run.steps < MIN_TIMED_STEPS or iteration <= 0:
        return None
    waiting = run.input_wait_seconds / iteration
    if waiting <= INPUT_WAIT_THRESHOLD:
        return None
    cost = _recovered(review.mfu, waiting)
    return Diagnosis(
        "input_bound",
        f"waiting for input took {waiting:.1%} of iteration time{_cost_text(review.mfu, cost)}; feed the GPU faster: "
        "DataLoader num_workers (a few per GPU), pin_memory=True, persistent_workers=True, prefetch_factor=2-4 "
        "(HF TrainingArguments: dataloader_num_workers, dataloader_pin_memory, dataloader_persistent_workers, "
        "dataloader_prefetch_factor), and tokenize ahead of time",
        value=waiting,
        threshold=INPUT_WAIT_THRESHOLD,
        mfu_cost=cost,
    )


@check("stragglers")
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


@check("recompute_cost")
def recompute_cost(review: Review) -> Diagnosis | None:
    """Activation checkpointing reruns forward passes in the backward: HFU counts them, MFU does not."""
    split = review.split
    if split is None or split.recompute_share < RECOMPUTE_THRESHOLD:
        return None
    run, mfu = review.run, review.mfu
    hfu = run.hardware_utilization(review.peak_flops)
    cost = _recovered(mfu, split.recompute_share)
    details = {"recompute_flops_share": split.recompute_share}
    gap = ""
    if mfu is not None and hfu is not None and cost is not None:
        recompute_gap = hfu * split.recompute_share  # the recompute FLOPs at the run's pace
        details.update(hfu=hfu, mfu=mfu, hfu_mfu_gap_from_recompute=recompute_gap)
        gap = (
            f": {recompute_gap:.1%} of the HFU - MFU gap (HFU {hfu:.1%}, MFU {mfu:.1%}); without it MFU would be "
            f"about {mfu + cost:.1%}"
        )
    return Diagnosis(
        "recompute_cost",
        f"gradient checkpointing reruns {split.recompute_share:.1%} of the computed FLOPs{gap}; if memory allows, "
        "turn it off, or checkpoint fewer layers (selective checkpointing), or trade it for a smaller micro-batch",
        value=split.recompute_share,
        threshold=RECOMPUTE_THRESHOLD,
        mfu_cost=cost,
        details=details,
    )


@lru_cache(maxsize=8192)  # the same layers at every metrics read
def _linear_component(name: str) -> str:
    return classify(name, (), activation_matmul=False)


@check("matmul_alignment")
def matmul_alignment(review: Review) -> Diagnosis | None:
    """Linear layers with sizes off the tensor cores' alignment, where a measurement says they cost time.

    A linear layer's FLOPs per token are proportional to its weight's size, so the share of the
    step's FLOPs a layer carries is its share of all linear weights times the share of FLOPs in
    linear layers (everything but attention scores). Costs as for the vocabulary (``alignment.py``):
    the run's own times per component first, then the measured table, else no cost claimed and only
    sizes off the dtype's alignment reported.
    """
    tile = MATMUL_ALIGNMENT.get(review.compute_dtype or "")
    split = review.split
    if review.profile_pending or tile is None or split is None or not split.model_flops:
        return None
    linears = review.shapes.linears
    total = sum(linear.in_features * linear.out_features for linear in linears)
    if not total:
        return None
    linear_flops = (1.0 - review.share_of_model_flops(ATTENTION_SCORES)) * split.model_flops
    costed: list[tuple[Linear, int, Cost]] = []  # layers with a measured cost
    unmeasured: list[tuple[Linear, int]] = []  # off the dtype's alignment, nothing measured
    in_run: dict[str, Cost | None] = {}
    for linear in linears:
        # The LM head's vocabulary dimension belongs to the vocabulary check.
        roles = [(IN_FEATURES, linear.in_features)]
        if not linear.is_head:
            roles.append((OUT_FEATURES, linear.out_features))
        for role, size in roles:
            if not size % 64:
                continue
            component = _linear_component(linear.name)
            if component not in in_run:
                in_run[component] = alignment.from_run(
                    review.measured_matmuls, component, review.step_seconds
                )
            flops = linear.in_features * linear.out_features / total * linear_flops
            # In-run times cost only sizes off the tile (see vocab_alignment); others need the table.
            cost = (in_run[component] if size % tile else None) or alignment.from_table(
                review.device_name,
                review.compute_dtype,
                size,
                role,
                linear.out_features if role == IN_FEATURES else linear.in_features,
                flops,
                review.run.wall_seconds,
            )
            if cost is not None:
                if cost.time_share != 0.0:
                    costed.append((linear, size, cost))
                break
            if size % tile:
                unmeasured.append((linear, size))
                break
    layers = list(dict.fromkeys(linear for linear, *_ in costed + unmeasured))
    share = (
        sum(linear.in_features * linear.out_features for linear in layers)
        / total
        * (linear_flops / split.model_flops)
    )
    if not layers or share < SHAPE_FLOPS_THRESHOLD:
        return None
    sizes = sorted({size for _, size, *_ in costed + unmeasured})
    multiple = alignment.padding_multiple(review.device_name, review.compute_dtype) if costed else tile
    fixes = ", ".join(f"{size} -> {_round_up(size, multiple)}" for size in sizes[:4])
    example = layers[0]
    head = (
        f"matmul sizes {', '.join(map(str, sizes[:6]))} in {len(layers)} layers (e.g. {example.name}, "
        f"{example.in_features}x{example.out_features}) carrying {share:.1%} of the step's FLOPs"
    )
    fix = f"use multiples of {multiple} for hidden, intermediate and adapter-rank sizes ({fixes})"
    details = {"alignment": float(multiple), "misaligned_layers": float(len(layers))}
    # Components measured in the run count once each; table costs add per layer.
    shares = {id(cost): cost.time_share for _, _, cost in costed if cost.in_run}
    shares.update({id(linear): cost.time_share for linear, _, cost in costed if not cost.in_run})
    time_share = sum(value for value in shares.values() if value is not None) if costed else None
    mfu_cost = _recovered(review.mfu, time_share) if time_share is not None and time_share < 1.0 else None
    if not costed:
        text = (
            f"{head} are not multiples of {tile} for {review.compute_dtype}; no slowdown was measured for "
            f"{review.device_name or 'this GPU'} at {review.compute_dtype}, so no cost is claimed "
            f"(mfu-callbacks doctor times them on this GPU)"
        )
    else:
        worst = max((cost for _, _, cost in costed), key=lambda cost: cost.slowdown)
        details.update(slowdown=worst.slowdown, measured_in_run=float(worst.in_run))
        if time_share is not None:
            details["time_share"] = time_share
        time_text = f", costing about {time_share:.1%} of the step's time" if time_share is not None else ""
        text = f"{head} run up to {_slowdown_text(worst)}{time_text}{_cost_text(review.mfu, mfu_cost)}"
    return Diagnosis(
        "matmul_alignment",
        f"{text}; {fix}",
        value=share,
        threshold=SHAPE_FLOPS_THRESHOLD,
        mfu_cost=mfu_cost,
        flops_share=share,
        details=details,
    )


@check("fp32_adapters")
def fp32_adapters(review: Review) -> Diagnosis | None:
    """Trainable weights in fp32 on a bf16/fp16 base run their matmuls in fp32 (without autocast)."""
    slowdown = FP32_ADAPTER_SLOWDOWN
    if slowdown is None or slowdown < FP32_ADAPTER_MIN_SLOWDOWN:
        return None  # shipped only with a cost measured on a GPU (benchmarks/bench_fp32_adapters.py)
    if review.compute_dtype not in ("bf16", "fp16") or review.autocast_in_training:
        return None  # under autocast the adapters' matmuls run in half precision anyway
    shapes = review.shapes
    if not shapes.fp32_trainable_parameters or shapes.half_frozen_parameters * 2 <= shapes.frozen_parameters:
        return None  # no fp32 trainables, or the base itself is not kept in half precision
    mfu = review.mfu
    cost = mfu * (slowdown - 1.0) if mfu is not None else None  # the step runs slowdown x faster in bf16
    adapters_share = review.share_of_model_flops("adapters") if review.split is not None else None
    cost_text = f" (MFU {mfu:.1%} -> about {mfu + cost:.1%})" if mfu is not None and cost is not None else ""
    return Diagnosis(
        "fp32_adapters",
        f"{shapes.fp32_trainable_parameters:,} trainable parameters are fp32 while the base computes in "
        f"{review.compute_dtype}: measured {slowdown:.2f}x step time (LoRA r=16 on a 1B Llama, H100){cost_text}; "
        f"keep them in {review.compute_dtype} (PEFT: get_peft_model(..., autocast_adapter_dtype=False)) or train "
        "under autocast",
        value=slowdown,
        threshold=FP32_ADAPTER_MIN_SLOWDOWN,
        mfu_cost=cost,
        flops_share=adapters_share,
        details={"fp32_trainable_parameters": float(shapes.fp32_trainable_parameters)},
    )


@check("gpu_clocks")
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


# -- helpers ---------------------------------------------------------------------------------------
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _slowdown_text(cost: Cost) -> str:
    """A measured slowdown and where it was measured."""
    if cost.in_run:
        return f"{cost.slowdown:.1f}x slower per FLOP than the step's fastest matmuls ({cost.source})"
    return cost.source  # "5.1x slower, measured on an H100 SXM at bf16 (...)"


def _recovered(mfu: float | None, wasted_share: float) -> float | None:
    """MFU gained if a share of the time went away: the same FLOPs in (1 - share) of the time."""
    if mfu is None or wasted_share >= 1.0:
        return None
    return mfu * wasted_share / (1.0 - wasted_share)


def _cost_text(mfu: float | None, cost: float | None) -> str:
    if mfu is None or cost is None:
        return ""
    return f": MFU {mfu:.1%} would be about {mfu + cost:.1%} without it"


def split_flops(engine: Any | None, features: torch.Tensor | None) -> FlopSplit | None:
    """Evaluate the engine's formula on the run's features, and again with the waste taken out.

    The hardware row of the features holds the computed tokens, the model row the real ones. The
    hardware formula on real tokens is the run without padding. The recompute is what the engine
    counted as rerun by activation checkpointing, not whatever hardware FLOPs exceed model FLOPs by
    (gradients forced onto inputs, a fused head's own recompute in its backward, a kernel's excess).
    """
    if engine is None or features is None:
        return None
    real = features[MODEL]
    run = engine.evaluate(features)
    if run.hardware_flops <= 0:
        return None
    without_padding = engine.evaluate(torch.stack([real, real])).hardware_flops
    # An engine that does not tell its recompute apart (one passed in ready-made) claims none.
    recompute = getattr(engine, "recompute_flops", None)
    recomputed = recompute(features) if recompute is not None else 0.0
    return FlopSplit(
        model_flops=float(run.model_flops),
        breakdown={name: float(value) for name, value in run.breakdown.items()},
        padding_share=max(0.0, 1.0 - without_padding / run.hardware_flops),
        recompute_share=max(0.0, recomputed / run.hardware_flops),
    )
