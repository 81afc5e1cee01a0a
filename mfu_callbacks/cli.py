"""The ``mfu-callbacks`` command line: plan a run's FLOPs before starting it, plot MFU after it.

    mfu-callbacks estimate --config config.json --seq-len 4096 --batch-size 8 --gpu h100
    mfu-callbacks estimate --config config.json --seq-len 2048 --batch-size 4 --lora-r 16 --lora-targets q_proj,v_proj
    mfu-callbacks plot wandb/offline-run-20261124_120000-abc123 -o mfu.png
    mfu-callbacks plot lightning_logs/version_0/metrics.csv -o mfu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import compare

EXIT_USAGE = 2
_MFU_LEVELS = (1.0, 0.5, 0.4)


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


def _load_config(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise CliError(f"config file not found: {path}")
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CliError(f"cannot read {path} as JSON: {error}") from None
    try:
        from transformers import AutoConfig
    except ImportError:
        raise CliError("estimate needs transformers: pip install 'mfu-callbacks[transformers]'") from None
    model_type = values.get("model_type")
    if not model_type:
        raise CliError(f"{path} has no 'model_type': is it a Hugging Face config.json?")
    try:
        return AutoConfig.for_model(**values)
    except (ValueError, KeyError, TypeError) as error:
        raise CliError(f"cannot build a {model_type!r} config from {path}: {error}") from None


def _build_model(config: Any, args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    factory = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = factory.from_config(config)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_targets.split(",") if args.lora_targets else "all-linear"
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets))
    return model


def _estimate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .flops import FlopEngine
    from .hardware import known_gpus, lookup_gpu

    gpu = None
    if args.gpu:
        gpu = lookup_gpu(args.gpu)
        if gpu is None:
            raise CliError(f"unknown GPU {args.gpu!r}; known: {', '.join(known_gpus())}")
    if args.seq_len <= 0 or args.batch_size <= 0:
        raise CliError("--seq-len and --batch-size must be positive")
    config = _load_config(args.config)
    model = _build_model(config, args)
    batch: dict[str, torch.Tensor] = {"input_ids": torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
    engine = FlopEngine.from_model(model, batch)
    step = engine.estimate(batch)
    result: dict[str, Any] = {
        "model_type": config.model_type,
        "tokens_per_step": step.tokens,
        "model_flops_per_step": step.model_flops,
        "hardware_flops_per_step": step.hardware_flops,
        "model_flops_per_token": step.model_flops / step.tokens,
        "breakdown": step.breakdown,
    }
    if gpu is not None:
        peak = gpu.peak_tflops(args.dtype) * 1e12 if hasattr(gpu, "peak_tflops") else None
        if peak is None:
            from .hardware import peak_flops

            peak = peak_flops(gpu.name, args.dtype)
        if peak is None:
            raise CliError(f"{gpu.name} has no {args.dtype} peak in the table")
        result["gpu"] = gpu.name
        result["peak_tflops"] = peak / 1e12
        result["at_mfu"] = {
            f"{level:.0%}": {"step_seconds": step.model_flops / (peak * level),
                             "tokens_per_sec": step.tokens * peak * level / step.model_flops}
            for level in _MFU_LEVELS
        }
    return result


def _print_estimate(result: dict[str, Any]) -> None:
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
            print(f"    at {level:>4} MFU: {numbers['step_seconds'] * 1e3:10.1f} ms per step, "
                  f"{numbers['tokens_per_sec']:12,.0f} tokens/s per GPU")


def _plot(args: argparse.Namespace) -> None:
    from ._runlog import RunLogError, read_curves

    if len(args.run) > 1:
        try:
            return compare.plot_runs(args.run, args.output, args.dpi)
        except (RunLogError, compare.CompareError) as error:
            raise CliError(str(error)) from None
    try:
        curves = read_curves(args.run[0])
    except RunLogError as error:
        raise CliError(str(error)) from None
    try:
        import matplotlib
    except ImportError:
        raise CliError("plot needs matplotlib: pip install 'mfu-callbacks[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (mfu_axis, loss_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5), height_ratios=(1, 1))
    steps, values = zip(*curves.mfu)
    mfu_axis.plot(steps, [100 * value for value in values], color="tab:green", marker=".")
    mfu_axis.set_ylabel("MFU (%)")
    mfu_axis.set_ylim(bottom=0)
    mfu_axis.grid(alpha=0.3)
    mfu_axis.set_title(f"MFU and loss: {Path(curves.source).name}", fontsize=10)
    if curves.loss:
        steps, values = zip(*curves.loss)
        loss_axis.plot(steps, values, color="tab:blue", marker=".")
    loss_axis.set_ylabel("loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(args.output, dpi=args.dpi)
    except OSError as error:
        raise CliError(f"cannot write {args.output}: {error}") from None
    plt.close(figure)
    print(f"wrote {args.output}: {len(curves.mfu)} MFU points, {len(curves.loss)} loss points from {curves.source}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfu-callbacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    estimate = commands.add_parser(
        "estimate", help="FLOPs per step and per token of a Hugging Face config, and what a GPU would need",
        description="Builds the model on the meta device from a local config.json (nothing is downloaded).",
        epilog="example: mfu-callbacks estimate --config config.json --seq-len 4096 --batch-size 8 --gpu h100",
    )
    estimate.add_argument("--config", required=True, help="a Hugging Face config.json")
    estimate.add_argument("--seq-len", type=int, required=True)
    estimate.add_argument("--batch-size", type=int, required=True)
    estimate.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    estimate.add_argument("--lora-targets", default="", help="comma-separated module names (default: all linear)")
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    estimate.add_argument("--gpu", help="e.g. h100, h200, a100, mi300x: adds step times at 100%%, 50%%, 40%% MFU")
    estimate.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp8", "tf32", "fp32"))
    estimate.add_argument("--json", action="store_true", help="print JSON")
    estimate.set_defaults(handler=_run_estimate)
    plot = commands.add_parser(
        "plot", help="the MFU curve above the loss curve, from a finished or running run",
        description="Reads a W&B offline run (folder or .wandb file), a Lightning metrics.csv or a Trainer "
                    "trainer_state.json.",
        epilog="examples:\n  mfu-callbacks plot wandb/offline-run-20261124_120000-abc123 -o mfu.png\n"
               "  mfu-callbacks plot lightning_logs/version_0/metrics.csv -o mfu.png\n"
               "  mfu-callbacks plot out/checkpoint-500/trainer_state.json -o mfu.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("run", nargs="+", help="W&B run folder or .wandb file, metrics.csv, or trainer_state.json; "
                                             "several runs are overlaid")
    plot.add_argument("-o", "--output", default="mfu.png", help="image to write (default: mfu.png)")
    plot.add_argument("--dpi", type=int, default=120)
    plot.set_defaults(handler=_plot)
    compare.add_parser(commands)
    return parser


def _run_estimate(args: argparse.Namespace) -> None:
    result = _estimate(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_estimate(result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "compare":
        return compare.run(args)
    try:
        args.handler(args)
    except CliError as error:
        print(f"mfu-callbacks: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
