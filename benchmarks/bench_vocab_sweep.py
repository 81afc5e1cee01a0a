"""What a misaligned size costs a linear layer's forward + backward: the rows of the slowdown table.

For each hidden size and each vocabulary (aligned to 64, aligned to 8 only, unaligned), a linear
layer hidden -> vocabulary (an LM head: the size is its out_features) and, with ``--roles out,in``,
vocabulary -> hidden (the size is its in_features) runs forward and backward (three GEMMs) on
``--tokens`` tokens. Printed: TFLOP/s of each, and the slowdown per FLOP against the next multiple
of 64. ``--out rows.json`` writes the measured rows in the format of
``mfu_callbacks.diagnostics.slowdowns.Slowdown`` (one row per role, hidden size and shape class: the
least slowdown of its sizes, and the fastest rate among them, so a cost is never overstated).

    python benchmarks/bench_vocab_sweep.py --out vocab_rows.json          # on a GPU (about a minute on an H100)
    python benchmarks/bench_vocab_sweep.py --smoke                        # CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch

from mfu_callbacks.diagnostics.slowdowns import IN_FEATURES, OUT_FEATURES, Slowdown, gpu_family, shape_class
from mfu_callbacks.doctor.timing import Timer

VOCABS = (32000, 32008, 32001, 32064, 50257, 50264, 50304, 128256, 128264, 128257, 151643, 151680)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMMAND = "benchmarks/bench_vocab_sweep.py"


def layer_seconds(
    tokens: int, in_features: int, out_features: int, dtype: torch.dtype, timer: Timer
) -> float:
    """Seconds of a linear layer's forward, input gradient and weight gradient."""
    device = timer.device
    x = torch.randn(tokens, in_features, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(tokens, out_features, dtype=dtype, device=device)

    def step() -> None:
        out = torch.nn.functional.linear(x, weight)
        torch.autograd.grad(out, (x, weight), grad)

    return timer.seconds(step)


def rate(
    rates: dict[tuple[str, int, int], float],
    role: str,
    hidden: int,
    size: int,
    tokens: int,
    dtype: torch.dtype,
    timer: Timer,
) -> float:
    """TFLOP/s of the layer with ``size`` in ``role`` (timed once per size)."""
    if (role, hidden, size) not in rates:
        shape = (hidden, size) if role == OUT_FEATURES else (size, hidden)
        seconds = layer_seconds(tokens, *shape, dtype, timer)
        rates[role, hidden, size] = 6 * tokens * hidden * size / seconds / 1e12
    return rates[role, hidden, size]


def round_up(size: int, multiple: int = 64) -> int:
    return -(-size // multiple) * multiple


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hiddens", default="2048,4096")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument(
        "--roles", default="out", help="out (an LM head), in (vocabulary -> hidden), or out,in"
    )
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write the measured rows as JSON (the slowdown table's format)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        torch.set_num_threads(1)
        args.hiddens, args.vocabs, args.tokens, args.repeats = "64", "960,968,961", 64, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    family = gpu_family(name) or name
    timer = Timer(device, args.repeats, warmup=3)
    dtype = DTYPES[args.dtype]
    roles = [OUT_FEATURES if role == "out" else IN_FEATURES for role in args.roles.split(",")]
    print(f"{name} ({family}), {args.dtype}, {args.tokens} tokens, linear forward + backward")
    print(
        f"{'role':<13} {'hidden':>6} {'size':>7} {'class':<22} {'TFLOP/s':>8} {'aligned':>7} {'TFLOP/s':>8} {'slowdown':>8}"
    )
    measured: dict[tuple[str, int, str], list[tuple[int, float, float, float]]] = {}
    rates: dict[tuple[str, int, int], float] = {}
    for role in roles:
        for hidden in map(int, args.hiddens.split(",")):
            for size in map(int, args.vocabs.split(",")):
                aligned = round_up(size)
                own, reference = (
                    rate(rates, role, hidden, n, args.tokens, dtype, timer) for n in (size, aligned)
                )
                slowdown = reference / own
                kind = shape_class(size) or "multiple_of_64"
                print(
                    f"{role:<13} {hidden:>6} {size:>7} {kind:<22} {own:>8.1f} {aligned:>7} {reference:>8.1f} {slowdown:>8.2f}"
                )
                if shape_class(size):
                    measured.setdefault((role, hidden, kind), []).append((size, slowdown, own, reference))
    today = datetime.date.today().isoformat()
    rows = [
        Slowdown(
            family=family,
            dtype=args.dtype,
            shape_class=kind,
            role=role,
            slowdown=round(max(1.0, min(item[1] for item in items)), 2),
            tflops=round(max(item[2] for item in items), 1),
            aligned_tflops=round(statistics.median(item[3] for item in items), 1),
            gpu=name,
            other_size=hidden,
            tokens=args.tokens,
            sizes=tuple(item[0] for item in items),
            source=f"{COMMAND} --tokens {args.tokens} --dtype {args.dtype}",
            date=today,
        )
        for (role, hidden, kind), items in sorted(measured.items())
    ]
    print("\nrows of the slowdown table:")
    for row in rows:
        print(f"  {row.role} {row.shape_class} hidden {row.other_size}: {row.label}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump([row.to_dict() for row in rows], file, indent=2)
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
