"""The precision check: fp32 trainable weights on a half-precision base run their matmuls in fp32."""

from __future__ import annotations

from ..review import Diagnosis, Review

# Step time of fp32 adapters over bf16 adapters on a bf16 base, measured on a GPU by
# benchmarks/bench_fp32_adapters.py. The diagnosis stays off until it is measured.
# H100 SXM, LoRA r=16 on all linear layers of a 1.1 B Llama-style model, batch 4 x 2048, bf16 base:
# 200.0 ms with fp32 adapters against 134.3 ms with bf16 adapters (benchmarks/RESULTS.md).
FP32_ADAPTER_SLOWDOWN: float | None = 1.489
FP32_ADAPTER_MIN_SLOWDOWN = 1.02  # below this the measured cost is within timing noise: never reported


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
