"""The waste checks: FLOPs computed and thrown away (padding tokens) or computed twice (recompute)."""

from __future__ import annotations

from ..review import Diagnosis, Review, cost_text, recovered

PADDING_THRESHOLD = 0.10  # padding share of computed tokens over the run
RECOMPUTE_THRESHOLD = 0.01  # recompute share of hardware FLOPs from which checkpointing counts as on


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
    cost = recovered(review.mfu, wasted)
    return Diagnosis(
        "padding_waste",
        f"padding is {padding:.1%} of computed tokens ({wasted:.1%} of computed FLOPs){cost_text(review.mfu, cost)}; "
        "pack sequences: HF Trainer DataCollatorWithFlattening (with flash attention), TRL "
        "SFTConfig(packing=True), Lightning or a plain loop: pack in the dataset or collate_fn",
        value=padding,
        threshold=PADDING_THRESHOLD,
        mfu_cost=cost,
        details={"padding_flops_share": wasted},
    )


def recompute_cost(review: Review) -> Diagnosis | None:
    """Activation checkpointing reruns forward passes in the backward: HFU counts them, MFU does not."""
    split = review.split
    if split is None or split.recompute_share < RECOMPUTE_THRESHOLD:
        return None
    run, mfu = review.run, review.mfu
    hfu = run.hardware_utilization(review.peak_flops)
    cost = recovered(mfu, split.recompute_share)
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
