"""The shape checks: an LM head or linear layers with sizes off the tensor cores' alignment.

Each claims a cost only from a measurement (``alignment.py``): the run's own matmul times per
component where profiled steps measured them, else the table of measured slowdowns for the GPU
family and dtype; without either, a size off the dtype's alignment is reported with no cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from ...flops.components import ATTENTION_SCORES, HEAD, classify
from .. import alignment
from ..alignment import Cost
from ..model_shapes import Linear
from ..review import Diagnosis, Review, cost_text, recovered
from ..slowdowns import IN_FEATURES, OUT_FEATURES

SHAPE_FLOPS_THRESHOLD = 0.01  # FLOP share of misaligned matmuls worth reporting (a 2-label classifier is not)
# Tensor cores want matmul sizes in multiples of 16 bytes of the operand dtype (NVIDIA's "Matrix
# Multiplication Background" guide). FP32 matmuls (without TF32) do not run on tensor cores, so
# their shapes are not checked. What a size off it costs is measured (alignment.py), not assumed.
MATMUL_ALIGNMENT: Mapping[str, int] = {"bf16": 8, "fp16": 8, "fp8": 16, "tf32": 4}


def vocab_alignment(review: Review) -> Diagnosis | None:
    """An LM head whose vocabulary is off the tensor cores' alignment, where a measurement says it costs time.

    Cost: the head's time x (1 - 1 / slowdown) as a share of the step. The slowdown and the head's
    time come from the run's own matmul times where profiled steps measured them, else from the
    table of measured slowdowns for this GPU family and dtype. Without either, a size off the
    dtype's alignment is reported with no cost, and one that meets it is not reported.
    """
    head = _unpadded_head(review)
    if head is None:
        return None
    cost = _head_cost(review, head)
    if cost is None and not head.vocab % head.tile:
        return None  # nothing measured, and the size meets the dtype's alignment (or no tensor cores)
    if cost is not None and cost.time_share == 0.0:
        return None  # measured: no cost at this size
    return _vocab_diagnosis(review, head, cost)


@dataclass(frozen=True)
class _Head:
    """The LM head as the vocabulary check sees it."""

    vocab: int
    hidden: int  # its input size; 0 where the model has no head layer to read it from
    flops_share: float  # of the step's model FLOPs
    flops: float  # of the run
    tile: int  # the dtype's alignment


def _unpadded_head(review: Review) -> _Head | None:
    """The head where its vocabulary is not a multiple of 64 and the dtype runs on tensor cores."""
    if review.profile_pending:
        return None  # judged once the profiled steps have measured the head
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
    return _Head(vocab, hidden, head_share, head_share * split.model_flops, tile)


def _head_cost(review: Review, head: _Head) -> Cost | None:
    """What the head's size costs: the run's own head time, else the measured table; None if neither knows."""
    # The run's own head time says how slow the head is, not why: it is read as the cost of
    # alignment only for a size off the dtype's tile (a small matmul is slow for other reasons).
    in_run = (
        alignment.from_run(review.measured_matmuls, HEAD, review.step_seconds)
        if head.vocab % head.tile
        else None
    )
    return in_run or alignment.from_table(
        review.device_name,
        review.compute_dtype,
        head.vocab,
        OUT_FEATURES,
        head.hidden,
        head.flops,
        review.run.wall_seconds,
    )


def _vocab_diagnosis(review: Review, head: _Head, cost: Cost | None) -> Diagnosis:
    """The diagnosis with its fix (the padded size), and its cost where one was measured."""
    vocab, tile, head_share = head.vocab, head.tile, head.flops_share
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
    mfu_cost = recovered(review.mfu, cost.time_share) if cost.time_share is not None else None
    details.update(slowdown=cost.slowdown, measured_in_run=float(cost.in_run))
    if cost.time_share is not None:
        details["time_share"] = cost.time_share
    time_text = (
        f", costing about {cost.time_share:.1%} of the step's time" if cost.time_share is not None else ""
    )
    return Diagnosis(
        "vocab_alignment",
        f"{what}: {head_text} runs {_slowdown_text(cost)}{time_text}{cost_text(review.mfu, mfu_cost)}; {fix}",
        value=float(vocab),
        threshold=float(multiple),
        mfu_cost=mfu_cost,
        flops_share=head_share,
        details=details,
    )


@lru_cache(maxsize=8192)  # the same layers at every metrics read
def _linear_component(name: str) -> str:
    return classify(name, (), activation_matmul=False)


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
    found = _misaligned_layers(review, linears, tile, total, linear_flops)
    share = (
        sum(linear.in_features * linear.out_features for linear in found.layers)
        / total
        * (linear_flops / split.model_flops)
    )
    if not found.layers or share < SHAPE_FLOPS_THRESHOLD:
        return None
    return _matmul_diagnosis(review, found, tile, share)


@dataclass
class _Misaligned:
    """Linear layers with a size off 64: those with a measured cost, and those off the dtype's tile
    with nothing measured."""

    costed: list[tuple[Linear, int, Cost]] = field(default_factory=list)
    unmeasured: list[tuple[Linear, int]] = field(default_factory=list)

    @property
    def layers(self) -> list[Linear]:
        return list(dict.fromkeys(linear for linear, *_ in self.costed + self.unmeasured))

    @property
    def sizes(self) -> list[int]:
        return sorted({size for _, size, *_ in self.costed + self.unmeasured})


def _misaligned_layers(
    review: Review, linears: tuple[Linear, ...], tile: int, total: int, linear_flops: float
) -> _Misaligned:
    """Each layer's first size off 64 that is measured to cost time or is off the tile (one per layer)."""
    found = _Misaligned()
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
                    found.costed.append((linear, size, cost))
                break
            if size % tile:
                found.unmeasured.append((linear, size))
                break
    return found


def _matmul_diagnosis(review: Review, found: _Misaligned, tile: int, share: float) -> Diagnosis:
    """The diagnosis with its fix (the padded sizes), and its cost where one was measured."""
    costed, layers, sizes = found.costed, found.layers, found.sizes
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
    mfu_cost = recovered(review.mfu, time_share) if time_share is not None and time_share < 1.0 else None
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
        text = f"{head} run up to {_slowdown_text(worst)}{time_text}{cost_text(review.mfu, mfu_cost)}"
    return Diagnosis(
        "matmul_alignment",
        f"{text}; {fix}",
        value=share,
        threshold=SHAPE_FLOPS_THRESHOLD,
        mfu_cost=mfu_cost,
        flops_share=share,
        details=details,
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _slowdown_text(cost: Cost) -> str:
    """A measured slowdown and where it was measured."""
    if cost.in_run:
        return f"{cost.slowdown:.1f}x slower per FLOP than the step's fastest matmuls ({cost.source})"
    return cost.source  # "5.1x slower, measured on an H100 SXM at bf16 (...)"
