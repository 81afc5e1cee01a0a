"""``mfu-callbacks estimate``: the FLOPs of one step of a Hugging Face config, and the step time a GPU
would need at a few MFU levels."""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

from ._common import CliError, ModelArguments, add_model_arguments
from .model import count_step

SUMMARY = "FLOPs per step and per token of a Hugging Face config, and what a GPU would need"
_MFU_LEVELS = (1.0, 0.5, 0.4)


def add_parser(commands: Any) -> None:
    estimate = commands.add_parser(
        "estimate",
        help=SUMMARY,
        description="Builds the model on the meta device from a local config.json (nothing is downloaded).",
        epilog="example: mfu-callbacks estimate --config config.json --seq-len 4096 --batch-size 8 --gpu h100",
    )
    add_model_arguments(estimate)
    estimate.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="count activation-checkpoint recompute in the hardware FLOPs",
    )
    estimate.add_argument(
        "--gpu", help="e.g. h100, h200, a100, l40s, mi300x: adds step times at 100%%, 50%%, 40%% MFU"
    )
    estimate.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp16", "fp8", "tf32", "fp32"),
        help="the precision of the matmuls, for the GPU's peak (default: bf16)",
    )
    estimate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    result = estimate(
        ModelArguments.of(args),
        gradient_checkpointing=args.gradient_checkpointing,
        gpu_name=args.gpu,
        dtype=args.dtype,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_estimate(result)


def estimate(
    arguments: ModelArguments,
    *,
    gradient_checkpointing: bool = False,
    gpu_name: str | None = None,
    dtype: str = "bf16",
) -> dict[str, Any]:
    """The step's tokens and FLOPs, and with ``gpu_name`` its time at each MFU level of ``_MFU_LEVELS``."""
    gpu = _gpu(gpu_name) if gpu_name else None
    config, _, step = count_step(arguments, gradient_checkpointing=gradient_checkpointing)
    result: dict[str, Any] = {
        "model_type": config.model_type,
        "tokens_per_step": step.tokens,
        "model_flops_per_step": step.model_flops,
        "hardware_flops_per_step": step.hardware_flops,
        "model_flops_per_token": step.model_flops / step.tokens,
        "breakdown": step.breakdown,
    }
    if gpu is not None:
        tflops = gpu.dense_tflops(dtype)
        if tflops is None:
            raise CliError(f"{gpu.name} has no {dtype} peak in the table: choose another --dtype")
        peak = tflops * 1e12
        result["gpu"] = gpu.name
        result["peak_tflops"] = tflops
        result["at_mfu"] = {
            f"{level:.0%}": {
                "step_seconds": step.model_flops / (peak * level),
                "tokens_per_sec": step.tokens * peak * level / step.model_flops,
            }
            for level in _MFU_LEVELS
        }
    return result


def _gpu(name: str) -> Any:
    """The table's GPU of ``--gpu``; an unknown name is an error with the closest known names."""
    from ..hardware import lookup_gpu, short_gpu_names

    gpu = lookup_gpu(name)
    if gpu is None:
        names = short_gpu_names()
        close = difflib.get_close_matches(name.lower(), names, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise CliError(
            f"unknown GPU {name!r}: {hint}known: {', '.join(names)} (a device name such as "
            "'NVIDIA H100 80GB HBM3' works too); for a chip the table lacks, leave --gpu out"
        )
    return gpu


def print_estimate(result: dict[str, Any]) -> None:
    print(f"{result['model_type']}: {result['tokens_per_step']:,} tokens per step")
    print(f"  model FLOPs per step     {result['model_flops_per_step']:.4g}")
    print(f"  hardware FLOPs per step  {result['hardware_flops_per_step']:.4g}")
    print(f"  model FLOPs per token    {result['model_flops_per_token']:.4g}")
    total = result["model_flops_per_step"] or 1
    print("  breakdown:")
    for name, flops in sorted(result["breakdown"].items(), key=lambda item: -item[1]):
        print(f"    {name:<24} {flops:>12.4g}  {flops / total:>6.1%}")
    if "gpu" in result:
        print(f"  on {result['gpu']} ({result['peak_tflops']:.1f} TFLOP/s dense peak):")
        for level, numbers in result["at_mfu"].items():
            print(
                f"    at {level:>4} MFU: {numbers['step_seconds'] * 1e3:10.1f} ms per step, "
                f"{numbers['tokens_per_sec']:12,.0f} tokens/s per GPU"
            )
