"""Per-step cost of measuring MFU, against no measurement and against Lightning's ThroughputMonitor.

Three variants of one plain training loop run interleaved in one process, in rotating order,
for many rounds: none; ours (``MFUMeter.start_step``/``end_step`` each step, ``metrics()`` every
50 steps); and what ThroughputMonitor does each step (``torch.cuda.synchronize()`` then
``Throughput.update``). Each round times a block of steps of each variant between two syncs; the
table gives each variant's median per-step time, and the median and quartiles over the rounds of
its ratio to none in the same round.

    python benchmarks/bench_overhead.py --size 1b --rounds 24 --steps 6
    python benchmarks/bench_overhead.py --size small --rounds 60 --steps 15
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from common import SIZES, batch_for, llama

from mfu_callbacks import MFUMeter


def make_variants(model, batch, device):
    meter = MFUMeter(model, warmup_steps=0)
    from lightning.fabric.utilities.throughput import Throughput

    throughput = Throughput(window_size=50)
    counters = {"ours": 0, "throughput_monitor": 0}
    host_seconds: list[float] = []  # host time inside start_step + end_step, per step of "ours"
    tokens = batch["input_ids"].numel()
    started = time.perf_counter()

    def ours(step):
        begin = time.perf_counter()
        meter.start_step(batch)
        middle = time.perf_counter()
        step()
        end = time.perf_counter()
        meter.end_step()
        host_seconds.append(middle - begin + time.perf_counter() - end)
        counters["ours"] += 1
        if counters["ours"] % 50 == 0:
            meter.metrics()

    def throughput_monitor(step):
        step()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        counters["throughput_monitor"] += 1
        throughput.update(
            time=time.perf_counter() - started,
            batches=counters["throughput_monitor"],
            samples=counters["throughput_monitor"] * len(batch["input_ids"]),
            lengths=counters["throughput_monitor"] * tokens,
        )
        if counters["throughput_monitor"] % 50 == 0:
            throughput.compute()

    ours.meter, ours.batch = meter, batch  # for the drained measurement
    variants = {"none": lambda step: step(), "ours": ours, "throughput_monitor": throughput_monitor}
    return variants, host_seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40, help="steps per variant per round")
    parser.add_argument(
        "--profile", action="store_true", help="print where start_step + end_step spend host time"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = llama(args.size).to(device)
    batch = batch_for(args.size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    variants, host_seconds = make_variants(model, batch, device)
    for _ in range(5):  # warm-up: allocator, kernels, the meter's engine
        for run in variants.values():
            run(step)
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            sync()
            begin = time.perf_counter()
            for _ in range(args.steps):
                variants[name](step)
            sync()
            per_step[name].append((time.perf_counter() - begin) / args.steps)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; model {args.size}; "
        f"{args.rounds} rounds x {args.steps} steps per variant, rotating order; torch {torch.__version__}"
    )
    print(
        f"{'variant':<20} {'median ms':>10} {'median of round ratios':>23} {'quartiles':>16} {'ratio of medians':>17}"
    )
    base = statistics.median(per_step["none"])
    for name in names:
        # Each round's blocks ran back to back, so a round's ratio cancels drift between rounds.
        ratios = sorted(t / b for t, b in zip(per_step[name], per_step["none"]))
        quartiles = statistics.quantiles(ratios, n=4)
        print(
            f"{name:<20} {statistics.median(per_step[name]) * 1e3:>10.2f} {statistics.median(ratios):>23.4f} "
            f"{quartiles[0]:>7.4f}..{quartiles[2]:<7.4f} {statistics.median(per_step[name]) / base:>17.4f}"
        )
    # The meter's own host time bounds its cost in a loop bound by the host (every microsecond
    # there delays the GPU); it is measured per step, without the round-to-round noise above.
    host = sorted(host_seconds[len(host_seconds) // 10 :])  # after the warm-up steps
    print(
        f"host time in start_step + end_step (real FLOP engine, this batch): median {statistics.median(host) * 1e6:.1f} us, "
        f"p90 {host[int(0.9 * len(host))] * 1e6:.1f} us = {statistics.median(host) / base:.4%} of the median step"
    )
    # In that loop the host runs ahead of the GPU, so each of the meter's kernel launches (two event
    # records, one counting op) can wait for room on a full launch queue: time the GPU spends on
    # queued work, which the step's own launches would wait for otherwise. The same calls in the same
    # loop with the queue drained before each show the meter's own host cost.
    profile = cProfile.Profile() if args.profile else None
    drained = sorted(
        drained_host_seconds(variants["ours"], step, sync, steps=max(50, args.steps * 4), profile=profile)
    )
    print(
        f"the same with the launch queue drained before each call: median {statistics.median(drained) * 1e6:.1f} us, "
        f"p90 {drained[int(0.9 * len(drained))] * 1e6:.1f} us"
    )
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


def drained_host_seconds(
    ours, step, sync, steps: int, profile: cProfile.Profile | None = None
) -> list[float]:
    """Host time of ``start_step`` + ``end_step`` with nothing queued on the GPU at either call."""
    meter = ours.meter
    batch = ours.batch
    seconds: list[float] = []
    for _ in range(steps):
        sync()
        begin = time.perf_counter()
        if profile is not None:
            profile.enable()
        meter.start_step(batch)
        if profile is not None:
            profile.disable()
        started = time.perf_counter()
        step()
        sync()
        before_end = time.perf_counter()
        if profile is not None:
            profile.enable()
        meter.end_step()
        if profile is not None:
            profile.disable()
        seconds.append(started - begin + time.perf_counter() - before_end)
    meter.metrics()
    return seconds


if __name__ == "__main__":
    main()
