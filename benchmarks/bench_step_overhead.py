"""The meter's cost on short training steps, with a confidence interval: paired, interleaved blocks.

Three variants of one training loop run in one process: none; ours (``MFUMeter.start_step(batch)`` /
``end_step()`` every step, ``metrics()`` every 50 steps, its read included); and a per-step
``torch.cuda.synchronize()``, what Lightning's ThroughputMonitor does after every batch. A round runs
one block of ``--steps`` steps of each variant, back to back, in an order that rotates through all six
permutations; each block is timed between two syncs. Per round the ratio of a variant's block to the
none block of the same round cancels the drift between rounds; the result is the geometric mean ratio
over the rounds with the 95% confidence interval of the mean log-ratio (Student t), and its width,
so it reads whichever way it falls: an interval within +-0.1% that holds 1.000 is "no measurable
cost at this resolution". The number of rounds is chosen to fill ``--budget`` seconds.

Cases:
- ``short``: a Llama-style model (hidden 1024, 8 layers, 16 heads, 8 KV heads, vocab 32000) on
  4 x 1024 tokens in bf16 autocast with fused AdamW: a step of about 10-20 ms on an H100.
- ``lora-host-bound``: the same family shrunk until the host is the bottleneck (hidden 256, 4 layers,
  PEFT LoRA r=8 on the attention and MLP projections, 2 x 128 tokens): launching the kernels takes
  longer than running them. The case prints the GPU busy fraction (kernel time summed by the torch
  profiler over wall time): well below 1 means the GPU waits for the host, so every microsecond of
  host work the meter adds lands on the step time.

On an H100 (both cases, about 6 minutes in all):

    python benchmarks/bench_step_overhead.py --case short --budget 180
    python benchmarks/bench_step_overhead.py --case lora-host-bound --budget 120

On a CPU, in seconds (tiny models, no claim about any GPU):

    python benchmarks/bench_step_overhead.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mfu_callbacks import MFUMeter
from mfu_callbacks.testing import causal_lm

READ_EVERY = 50  # steps between two metrics() calls of "ours", as a logger would
# Two-sided 95% Student t quantiles for small degrees of freedom; 1.96 beyond.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T95.update({12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980})


@dataclass(frozen=True)
class Case:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rows: int
    length: int
    lora_rank: int | None = None


CASES = {
    "short": Case(hidden=1024, layers=8, heads=16, kv_heads=8, vocab=32000, rows=4, length=1024),
    "lora-host-bound": Case(
        hidden=256, layers=4, heads=4, kv_heads=4, vocab=8192, rows=2, length=128, lora_rank=8
    ),
    "smoke": Case(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, rows=2, length=16),
    "smoke-lora": Case(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, rows=2, length=16, lora_rank=4),
}


def t95(degrees: int) -> float:
    """The two-sided 95% quantile of Student's t (the nearest tabulated degrees at or below)."""
    if degrees > 120:
        return 1.96
    return _T95[max(known for known in _T95 if known <= degrees)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(case: Case, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor], Callable[[], None]]:
    model = causal_lm(
        hidden=case.hidden,
        layers=case.layers,
        heads=case.heads,
        kv_heads=case.kv_heads,
        intermediate=int(2.75 * case.hidden),
        vocab=case.vocab,
        max_positions=case.length,
        lora_rank=case.lora_rank,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ).to(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, case.vocab, (case.rows, case.length), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, batch, step


def variants(
    model: nn.Module, batch: dict[str, torch.Tensor], step: Callable[[], None], device: torch.device
) -> dict[str, Callable[[], None]]:
    meter = MFUMeter(model, warmup_steps=0, peak_tflops=989.4 if device.type == "cuda" else 1.0)
    done = [0]

    def ours() -> None:
        meter.start_step(batch)
        step()
        meter.end_step()
        done[0] += 1
        if done[0] % READ_EVERY == 0:
            meter.metrics()

    def synchronized() -> None:
        step()
        sync(device)

    return {"none": step, "ours": ours, "sync per step": synchronized}


def block(run: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step of ``steps`` steps, timed between two syncs."""
    sync(device)
    begin = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - begin) / steps


def busy_fraction(step: Callable[[], None], device: torch.device, steps: int = 20) -> float | None:
    """GPU kernel time over wall time of ``steps`` plain steps (torch profiler); None without CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - begin
    kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(event.time_range.elapsed_us() for event in kernels)  # kernels, copies and fills
    return busy_us / 1e6 / wall if kernels else None


def interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean ratio and the 95% interval of the mean log-ratio, as ratios."""
    logs = [math.log(ratio) for ratio in ratios]
    mean = statistics.fmean(logs)
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def run_case(name: str, case: Case, steps: int, budget: float, device: torch.device) -> None:
    model, batch, step = build(case, device)
    runs = variants(model, batch, step, device)
    for run in runs.values():  # warm-up: allocator, kernels, the meter's engine and its first read
        block(run, max(3, steps // 4), device)
    calibration = statistics.median(block(runs["none"], steps, device) for _ in range(3))
    rounds = max(6, int(budget / (len(runs) * steps * calibration)))
    try:
        busy = busy_fraction(step, device)
    except Exception as error:  # noqa: BLE001 - the profiler is a side measurement
        print(f"GPU busy fraction not measured: {error}")
        busy = None
    names = list(runs)
    orders = list(itertools.permutations(names))
    per_step: dict[str, list[float]] = {variant: [] for variant in names}
    started = time.perf_counter()
    for round_index in range(rounds):
        for variant in orders[round_index % len(orders)]:
            per_step[variant].append(block(runs[variant], steps, device))
    elapsed = time.perf_counter() - started

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parameters = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    print(
        f"\ncase {name}: {parameters / 1e6:.1f} M parameters ({trainable / 1e6:.2f} M trainable), "
        f"{case.rows} x {case.length} tokens; device {device_name}; torch {torch.__version__}"
    )
    print(
        f"{rounds} rounds x {steps} steps per variant, order rotating through all permutations; "
        f"{elapsed:.0f} s measured"
    )
    if busy is not None:
        verdict = "host-bound: the GPU waits for kernel launches" if busy < 0.7 else "GPU-bound"
        print(f"GPU busy fraction of a plain step (kernel time / wall time): {busy:.2f} ({verdict})")
    print(f"{'variant':<15} {'median ms':>10} {'mean ratio':>11} {'95% interval':>19} {'width':>8}")
    for variant in names:
        median = statistics.median(per_step[variant]) * 1e3
        if variant == "none":
            print(f"{variant:<15} {median:>10.3f} {1:>11.4f}")
            continue
        ratios = [time / base for time, base in zip(per_step[variant], per_step["none"])]
        mean, low, high = interval(ratios)
        print(
            f"{variant:<15} {median:>10.3f} {mean:>11.4f} {low:>9.4f}..{high:<8.4f} {100 * (high - low):>7.3f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["short", "lora-host-bound", "all"], default="short")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per case")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds (CPU)")
    args = parser.parse_args()
    logging.getLogger("mfu_callbacks").setLevel(logging.ERROR)  # diagnoses are not what is measured
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        torch.set_num_threads(1)  # tiny steps: threads only contend
        for name in ("smoke", "smoke-lora"):
            run_case(name, CASES[name], steps=5, budget=args.budget or 2.0, device=device)
        return
    names = ["short", "lora-host-bound"] if args.case == "all" else [args.case]
    for name in names:
        budget = args.budget or (180.0 if name == "short" else 120.0)
        run_case(name, CASES[name], args.steps, budget, device)


if __name__ == "__main__":
    main()
