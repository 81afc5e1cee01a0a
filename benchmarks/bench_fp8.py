"""fp8 training (torchao float8, tensorwise and rowwise) on the GPU table's 0.7B model: logged MFU against an
independent truth, and the speed-up over bf16.

The model: Llama-style, hidden 2048, 12 layers, 4 x 2048 tokens, bf16 weights, SDPA, AdamW (fused on a
GPU), a plain loop with ``MFUMeter`` (no dtype given: each matmul judged against its own dtype's peak).
torchao's ``convert_to_float8_training`` converts the decoder's linears; the head stays in bf16.

The truth of each run: FlopCounterMode's FLOPs of one step of the bf16 twin (eager attention), split
into what the converted linears compute (the decoder layers' ``mm``: fp8 in the fp8 runs) and the
rest (attention, head: bf16), times the measured steps, judged against the datasheet's dense peaks
(H100/H200 SXM: bf16 989.4, fp8 1,978.9 TFLOP/s; other GPUs: the package's table), over the wall clock
of the measured steps (a sync before and after). Printed per variant: step time, logged MFU, truth
MFU, their ratio, the logged model FLOPs over the truth's (total and fp8 part), the speed-up over bf16.

    python benchmarks/bench_fp8.py                       # one GPU, torchao installed; ~2 minutes on an H200
    python benchmarks/bench_fp8.py --no-meter            # the same loops without the meter (isolation)
    python benchmarks/bench_fp8.py --tiny                # CPU: a tiny model, peaks of an H100 SXM; without
                                                         # torchao the tests' fp8 stand-in (torch._scaled_mm)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from common import SIZES, batch_for, llama, sync
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks import MFUMeter
from mfu_callbacks.hardware import PeakInfo, lookup_gpu, peak_flops
from mfu_callbacks.testing import make_eager

SIZES.setdefault("0.7b", (2048, 12, 16, 8, 5632, 32000, 2048, 4))  # the GPU table's model
DATASHEET_TFLOPS = {
    "H100": {"bf16": 989.4, "fp8": 1978.9},
    "H200": {"bf16": 989.4, "fp8": 1978.9},
}  # SXM, dense
VARIANTS = ("bf16", "tensorwise", "rowwise")


def convert(model: nn.Module, recipe: str) -> str:
    """The decoder's linears to fp8 by ``recipe`` (the head stays in bf16); what did it."""
    skip_head = lambda module, name: name.rpartition(".")[2] != "lm_head"  # noqa: E731
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
        from fp8 import convert_to_fp8  # the tests' stand-in: torch._scaled_mm, no torchao

        convert_to_fp8(model, recipe)
        return "tests/helpers/fp8.py stand-in (torchao not installed)"
    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=skip_head
    )
    return "torchao.float8"


def truth_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """One step of the bf16 model by FlopCounterMode (eager attention): the decoder layers' ``mm`` (the
    linears fp8 runs convert) and the rest (attention's ``bmm``, the head)."""
    eager = make_eager(copy.deepcopy(model))
    with FlopCounterMode(display=False) as counter:
        eager(**batch).loss.backward()
    counts = counter.get_flop_counts()
    layers = [name for name in counts if name.rpartition(".")[0].endswith("model.layers")]
    linears = sum(counts[name].get(torch.ops.aten.mm, 0) for name in layers)
    del eager
    return linears, counter.get_total_flops() - linears


def peaks(device: torch.device) -> tuple[dict[str, float], str]:
    """Dense peak FLOP/s at bf16 and fp8, and where they came from."""
    if device.type != "cuda":
        return {k: v * 1e12 for k, v in DATASHEET_TFLOPS["H100"].items()}, "H100 SXM datasheet (CPU run)"
    name = torch.cuda.get_device_name(device)
    for family, figures in DATASHEET_TFLOPS.items():
        if family in name and "NVL" not in name and "PCIe" not in name:
            return {k: v * 1e12 for k, v in figures.items()}, f"{family} SXM datasheet"
    table = {key: peak_flops(device, key) or float("nan") for key in ("bf16", "fp8")}
    return table, "the package's peak table"


def h100_peak() -> PeakInfo:
    """For a CPU run: the meter judges as if on an H100 SXM (its row of the table)."""
    row = lookup_gpu("h100")
    assert row is not None
    table = tuple(
        (key, value * 1e12)
        for key in ("fp32", "tf32", "bf16", "fp16", "fp8")
        if (value := row.dense_tflops(key))
    )
    return PeakInfo(989.4e12, row.name, "bf16", row.source, table)


def run(variant: str, args: argparse.Namespace, device: torch.device, truth: tuple[int, int]) -> dict:
    torch.manual_seed(0)
    with device:
        model = llama(args.size).to(torch.bfloat16)
    how = convert(model, variant) if variant != "bf16" else "bf16"
    fused = device.type == "cuda" and not args.unfused_adamw
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    meter = None
    if not args.no_meter:
        peak = h100_peak() if device.type != "cuda" else None
        meter = MFUMeter(model, warmup_steps=args.warmup, peak=peak)
    batch = batch_for(args.size, device)
    for step in range(args.warmup + args.measured):
        if step == args.warmup:
            sync()
            start = time.perf_counter()
        if meter is not None:
            meter.start_step(batch)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if meter is not None:
            meter.end_step()
    sync()
    seconds = time.perf_counter() - start
    summary = meter.summary() if meter is not None else {}
    flops = meter.run_flops() if meter is not None else None
    table, source = peaks(device)
    in_fp8, rest = (value * args.measured for value in truth)
    if variant == "bf16":
        truth_mfu = (in_fp8 + rest) / table["bf16"] / seconds
    else:
        truth_mfu = (in_fp8 / table["fp8"] + rest / table["bf16"]) / seconds
    result = {
        "variant": variant,
        "fp8_by": how,
        "fused_adamw": fused,
        "step_ms": 1000 * seconds / args.measured,
        "truth_mfu": truth_mfu,
        "peaks": source,
        "truth_fp8_share": in_fp8 / (in_fp8 + rest),
    }
    if meter is not None:
        logged = summary.get("mfu")
        result["logged_mfu"] = logged
        result["mfu_ratio"] = logged / truth_mfu if logged else None
        if flops is not None:
            result["flops_ratio"] = flops.model_flops / (in_fp8 + rest)
            fp8_logged = flops.model_by_dtype.get("fp8", 0)
            result["fp8_flops_ratio"] = fp8_logged / in_fp8 if variant != "bf16" else None
        result["matmul_dtypes"] = {k: round(share, 4) for k, (share, _) in meter.matmul_dtypes().items()}
        result["diagnoses"] = [d.id for d in meter.diagnostics()]
    del model, optimizer, meter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-meter", action="store_true", help="run the loops without MFUMeter")
    parser.add_argument("--unfused-adamw", action="store_true", help="AdamW without fused=True on a GPU")
    args = parser.parse_args()
    args.size = "tiny" if args.tiny else "0.7b"
    if args.tiny:
        args.warmup, args.measured = min(args.warmup, 1), min(args.measured, 3)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    with device:
        twin = llama(args.size).to(torch.bfloat16)
    truth = truth_flops(twin, batch_for(args.size, device))
    del twin
    results = [run(variant, args, device, truth) for variant in args.variants]
    base = next((r["step_ms"] for r in results if r["variant"] == "bf16"), None)
    for result in results:
        result["speedup_over_bf16"] = base / result["step_ms"] if base else None
        print(json.dumps(result))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, model {args.size}, {args.measured} measured steps")
    print(f"{'variant':<11}{'ms/step':>9}{'logged':>9}{'truth':>9}{'ratio':>8}{'FLOPs':>8}{'speed-up':>10}")
    for r in results:
        cells = [r.get("logged_mfu"), r["truth_mfu"], r.get("mfu_ratio"), r.get("flops_ratio")]
        shown = [f"{c:.4f}" if isinstance(c, float) else "-" for c in cells]
        speedup = f"{r['speedup_over_bf16']:.3f}" if r["speedup_over_bf16"] else "-"
        print(
            f"{r['variant']:<11}{r['step_ms']:>9.1f}"
            + "".join(f"{s:>9}" for s in shown[:2])
            + f"{shown[2]:>8}{shown[3]:>8}{speedup:>10}"
        )


if __name__ == "__main__":
    main()
