"""``mfu-callbacks doctor``: time a model's step piece by piece on this device, before training it.

mfu-callbacks doctor --config config.json --batch-size 4 --seq-len 2048
mfu-callbacks doctor --config config.json --batch-size 4 --seq-len 2048 --lora-rank 16 --json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..doctor import MIXED_PRECISION, TORCH_DTYPES, Examination, examine
from ..doctor.budget import TooLarge
from ._common import CliError, ModelArguments, add_model_arguments
from .model import count_step

CPU_REPEATS, GPU_REPEATS = 3, 10
MAX_REPEATS = 10_000
ROUNDS, MAX_ROUNDS = 3, 1_000


SUMMARY = "time each matmul shape, attention and the optimizer of a config's step on this device"


def add_parser(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help=SUMMARY,
        description="Builds the model on the meta device from a local config.json (nothing is downloaded), "
        "reads the distinct matmul shapes of one training step and times each here: the step's compute "
        "floor, the MFU ceiling it implies, a predicted step time, and what padding misaligned sizes buys.",
        epilog="example: mfu-callbacks doctor --config config.json --batch-size 4 --seq-len 2048",
    )
    add_model_arguments(doctor)
    doctor.add_argument(
        "--dtype",
        default="bf16",
        choices=tuple(TORCH_DTYPES),
        help="bf16/fp16: mixed precision (fp32 weights, autocast); tf32/fp32: fp32 matmuls (default: bf16)",
    )
    doctor.add_argument(
        "--packed", action="store_true", help="the rows are packed into one (restarting position_ids, SDPA)"
    )
    doctor.add_argument("--device", help="where to time (default: cuda if available, else cpu)")
    doctor.add_argument(
        "--repeats",
        type=int,
        help=f"timed calls per shape (default: {GPU_REPEATS} on a GPU, {CPU_REPEATS} on a CPU)",
    )
    doctor.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"times every piece is timed, round after round; figures are the median, the spread is shown "
        f"and padding is advised only when its saving exceeds it (default: {ROUNDS})",
    )
    doctor.add_argument(
        "--peak-tflops", type=float, help="dense peak TFLOP/s of one GPU, for a GPU the table lacks"
    )
    doctor.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    result = diagnose(args)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_examination(result, packed=args.packed, lora=bool(args.lora_rank))


def diagnose(args: argparse.Namespace) -> Examination:
    """The examination the command line asks for (errors as ``CliError``)."""
    import torch

    from .. import _validate
    from ..hardware import resolve_peak

    arguments = ModelArguments.of(args)
    if args.repeats is not None and not 1 <= args.repeats <= MAX_REPEATS:
        raise CliError(
            f"--repeats must be from 1 to {MAX_REPEATS:,} (got {args.repeats:,}): timed calls per shape, e.g. 10"
        )
    if not 1 <= args.rounds <= MAX_ROUNDS:
        raise CliError(
            f"--rounds must be from 1 to {MAX_ROUNDS:,} (got {args.rounds:,}): timing rounds, e.g. 3"
        )

    try:
        peak_override = _validate.peak_tflops(args.peak_tflops, name="--peak-tflops")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, RuntimeError) as error:
        raise CliError(str(error)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(
            f"--device {args.device}: torch sees no CUDA device here; leave --device out to time on the CPU"
        )
    config, model, step = count_step(arguments)
    if getattr(config, "is_encoder_decoder", False):
        raise CliError(
            f"{args.config} is an encoder-decoder ({config.model_type!r}): doctor times decoder-only language "
            "models; use estimate for its FLOPs"
        )
    peak = resolve_peak(device, args.dtype, override_tflops=peak_override)
    try:
        return examine(
            model,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            device=device,
            packed=args.packed,
            repeats=args.repeats or (GPU_REPEATS if device.type == "cuda" else CPU_REPEATS),
            rounds=args.rounds,
            model_flops=step.model_flops,
            peak_flops=peak.flops if peak is not None else None,
        )
    except TooLarge as error:
        raise CliError(f"{error}: {_blame(error.piece.sizes, config, arguments)}") from None
    except torch.cuda.OutOfMemoryError as error:
        raise CliError(
            f"out of GPU memory while timing a shape ({' '.join(str(error).split())[:200]}): free the GPU, "
            "or time a smaller --batch-size and scale"
        ) from None


def _blame(sizes: tuple[int, ...], config: Any, arguments: ModelArguments) -> str:
    """Which options and config fields gave the piece its sizes, and what to do."""
    named = []
    tokens = arguments.batch_size * arguments.seq_len
    if tokens in sizes:
        named.append(f"--batch-size x --seq-len ({tokens:,} tokens)")
    elif arguments.seq_len in sizes and arguments.seq_len > 1:
        named.append(f"--seq-len {arguments.seq_len:,}")
    fields = sorted(
        (value, key)
        for key, value in _int_fields(config.to_dict())
        if value > max(sizes) // 16 and value in sizes and value not in (tokens, arguments.seq_len)
    )
    named += [f"{key} {value:,} in {arguments.config}" for value, key in reversed(fields[-2:])]
    cause = f"from {' and '.join(named)}" if named else "check the config's sizes"
    return f"{cause}; time a smaller one and scale (estimate counts any size without allocating)"


def _int_fields(values: dict, prefix: str = "") -> list[tuple[str, int]]:
    found = []
    for key, value in values.items():
        if isinstance(value, dict):
            found += _int_fields(value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            found.append((f"{prefix}{key}", value))
    return found


def print_examination(result: Examination, *, packed: bool = False, lora: bool = False) -> None:
    mode = "mixed precision, fp32 weights" if result.dtype in MIXED_PRECISION else "fp32 weights"
    what = ", ".join(filter(None, ["LoRA" if lora else "full", "packed" if packed else ""]))
    print(f"{result.device}, {result.dtype} ({mode}), {what}: {result.tokens:,} tokens per step")
    _print_pieces(result)
    _print_step(result)
    _print_padding(result)


def _print_pieces(result: Examination) -> None:
    """Each distinct matmul shape and attention call: its rate and its time per step."""
    print("  matmuls, per step (M x K x N; T: a transposed operand):")
    print(f"    {'count':>5}  {'shape':<26} {'TFLOP/s':>8} {'ms/step':>8}  layers")
    for item in sorted(result.matmuls, key=lambda item: -item.step_seconds):
        shape = item.shape
        name = f"{shape.batch}x" if shape.batch > 1 else ""
        name += f"{shape.m}{'T' if shape.a_t else ''}x{shape.k}x{shape.n}{'T' if shape.b_t else ''}"
        rate = shape.flops / item.seconds / 1e12 if item.seconds > 0 else float("nan")
        print(f"    {item.count:>5}  {name:<26} {rate:>8.1f} {item.step_seconds * 1e3:>8.2f}  {item.layers}")
    for call in result.attention:
        attention = call.shape
        kind = "causal" if attention.causal else "full"
        if attention.masked:
            kind = f"block-diagonal mask of {call.segments} documents"
        rate = attention.flops / call.seconds / 1e12 if call.seconds > 0 else float("nan")
        print(
            f"    {call.count:>5}  attention {attention.batch}x{attention.heads}x{attention.q_len}x"
            f"{attention.head_dim} ({attention.kv_heads} kv heads, {kind}"
            f"{', fwd+bwd' if attention.backward else ''}): {rate:.1f} TFLOP/s, "
            f"{call.step_seconds * 1e3:.2f} ms/step"
        )


def _print_step(result: Examination) -> None:
    """The step's compute floor, MFU ceiling, optimizer, other ops, and the predicted step time."""
    ceiling = result.mfu_at(result.floor_seconds)
    predicted = result.mfu_at(result.predicted_seconds)
    print(
        f"  compute floor    {result.floor_seconds * 1e3:9.2f} ms  measured: matmuls "
        f"{result.matmul_seconds * 1e3:.2f}, attention {result.attention_seconds * 1e3:.2f}"
        f"{_spread_text(result.floor_rounds)}"
    )
    if ceiling is not None and result.peak_flops:
        print(
            f"  MFU ceiling      {ceiling:9.1%}     model FLOPs / floor / {result.peak_flops / 1e12:.1f} TFLOP/s peak"
        )
    else:
        print(
            "  MFU ceiling          n/a     no peak for this device: pass --peak-tflops (dense TFLOP/s of one "
            "GPU) or set MFU_PEAK_TFLOPS"
        )
    print(
        f"  optimizer        {result.optimizer_seconds * 1e3:9.2f} ms  measured: AdamW over "
        f"{result.optimizer_parameters:,} parameters"
        + (
            f" (timed on {result.optimizer_parameters_timed:,}, scaled)"
            if result.optimizer_parameters_timed < result.optimizer_parameters
            else ""
        )
    )
    print(
        f"  other ops        {result.other_seconds * 1e3:9.2f} ms  measured: {result.other_ops:,} ops "
        f"(norms, activations, casts, loss) replayed, moving {result.other_bytes / 1e9:.2f} GB"
    )
    if result.other_modelled_ops:
        print(
            f"    of which modelled {result.other_modelled_seconds * 1e3:.2f} ms: {result.other_modelled_ops} ops "
            f"that cannot run on made-up data, their bytes at {result.copy_bandwidth / 1e9:.0f} GB/s (copy), "
            f"at least {result.tiny_kernel_seconds * 1e6:.1f} us each"
        )
    predicted_text = f" -> MFU {predicted:.1%}" if predicted is not None else ""
    print(
        f"  predicted step   {result.predicted_seconds * 1e3:9.2f} ms{predicted_text}"
        f"{_spread_text(result.predicted_rounds)}"
    )


def _print_padding(result: Examination) -> None:
    """Padding advice where its saving exceeds the spread of the timings, and where it does not."""
    gains = [(item, item.padding_gain) for item in result.matmuls if item.padding_gain]
    for item, (padded, seconds) in sorted(gains, key=lambda pair: -pair[1][1]):
        shape = item.shape
        print(
            f"  padding {shape.m}x{shape.k}x{shape.n} ({item.layers}) to {padded} saves "
            f"{seconds * 1e3:.2f} ms per step (more than the spread of its timings, "
            f"{item.step_spread * 1e3:.2f} ms)"
        )
    for item in result.matmuls:
        best = min(item.padded.values(), default=None)
        if item.padding_gain is None and best is not None and best < item.seconds:
            shape = item.shape
            print(
                f"  padding {shape.m}x{shape.k}x{shape.n} ({item.layers}): no advice, its saving "
                f"({(item.seconds - best) * item.count * 1e3:.2f} ms per step) is within the noise of this "
                f"machine's timings (spread {item.step_spread * 1e3:.2f} ms over {result.rounds} rounds)"
            )


def _spread_text(rounds: tuple[float, ...]) -> str:
    """ ", spread 1.20 ms over 3 rounds (11.90-13.10)": how much the rounds disagreed."""
    if len(rounds) < 2:
        return ""
    low, high = min(rounds), max(rounds)
    return (
        f"; spread {(high - low) * 1e3:.2f} ms over {len(rounds)} rounds ({low * 1e3:.2f}-{high * 1e3:.2f})"
    )
