"""Where the step time goes, on the GPU table's configurations, from the meter's profiled steps.

A 0.7B Llama-style model (hidden 2048, 12 layers, 4 x 2048 tokens, bf16 weights, SDPA, fused AdamW)
in a plain loop with ``MFUMeter(profile_steps=3)``: full fine-tuning, LoRA (r=16, all linear layers),
packed rows (one row of 8192 tokens, documents marked by restarting ``position_ids``), and full
fine-tuning with a vocabulary of 32001 instead of 32000. For each: the breakdown, the sum of its
buckets against the mean step time the meter measured on the unprofiled steps, and the top advice;
then the head's time at 32001 against 32000.

    python benchmarks/bench_breakdown.py                 # on a GPU, about a minute
    python benchmarks/bench_breakdown.py --smoke         # a tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from mfu_callbacks import MFUMeter
from mfu_callbacks.attribution import format_breakdown
from mfu_callbacks.testing import causal_lm

GPU_SIZE = dict(hidden=2048, layers=12, heads=16, kv_heads=8, intermediate=5632, rows=4, length=2048)
SMOKE_SIZE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, rows=2, length=64)


def build(size: dict, vocab: int, lora: bool, device: torch.device) -> torch.nn.Module:
    model = causal_lm(
        hidden=size["hidden"],
        layers=size["layers"],
        heads=size["heads"],
        kv_heads=size["kv_heads"],
        intermediate=size["intermediate"],
        vocab=vocab,
        max_positions=size["rows"] * size["length"],
        lora_rank=16 if lora else None,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype)


def batch(size: dict, vocab: int, packed: bool, device: torch.device) -> dict[str, torch.Tensor]:
    rows, length = size["rows"], size["length"]
    generator = torch.Generator().manual_seed(0)
    if not packed:
        ids = torch.randint(0, vocab, (rows, length), generator=generator)
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    total = rows * length
    documents = [length // 2, length, length // 4]
    documents.append(total - sum(documents))
    positions = torch.cat([torch.arange(n) for n in documents if n > 0])[None, :]
    ids = torch.randint(0, vocab, (1, total), generator=generator)
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "labels": ids.to(device)}


def run(name: str, size: dict, vocab: int, lora: bool, packed: bool, device: torch.device, steps: int):
    model = build(size, vocab, lora, device)
    data = batch(size, vocab, packed, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    meter = MFUMeter(
        model,
        warmup_steps=3,
        profile_steps=3,
        profile_start=6,
        peak_tflops=None if device.type == "cuda" else 1.0,
    )
    started = time.perf_counter()
    for _ in range(steps):
        meter.start_step(data)
        model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step()
    metrics = meter.metrics()
    result = meter.step_breakdown()
    print(f"\n=== {name}: MFU {metrics.get('mfu', float('nan')):.1%}, {time.perf_counter() - started:.0f} s")
    if result is None:
        print(meter.profile_note)
        return None
    print(format_breakdown(result))
    if result.measured_step_seconds:
        measured = result.measured_step_seconds
        print(
            f"against the measured step: profiled step {result.profiled_step_seconds / measured:.4f}, "
            f"kernels {result.busy_seconds / measured:.4f}, sum of buckets {result.total_seconds / measured:.4f}"
        )
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    size = SMOKE_SIZE if args.smoke else GPU_SIZE
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {where}; torch {torch.__version__}; {args.steps} steps per configuration")
    configurations = {  # name: (title, vocabulary, LoRA, packed)
        "full": ("full", 32000, False, False),
        "lora": ("LoRA r=16", 32000, True, False),
        "packed": ("packed, position_ids", 32000, False, True),
        "vocab 32001": ("full, vocabulary 32001", 32001, False, False),
    }
    results = {
        key: run(title, size, vocab, lora, packed, device, args.steps)
        for key, (title, vocab, lora, packed) in configurations.items()
        if not args.only or key in args.only
    }
    aligned, misaligned = results.get("full"), results.get("vocab 32001")
    if aligned is not None and misaligned is not None:
        head, slow = aligned.matmul_buckets().get("head"), misaligned.matmul_buckets().get("head")
        if head is not None and slow is not None:
            print(
                f"\nhead: {1e3 * head.seconds:.2f} ms at 32000, {1e3 * slow.seconds:.2f} ms at 32001 "
                f"({slow.seconds / head.seconds:.2f}x); top advice at 32001: "
                f"{misaligned.advice[0].bucket if misaligned.advice else None}"
            )


if __name__ == "__main__":
    main()
