"""What MFU's log-time path costs a real run, and logged MFU against the wall clock, at every log interval.

HF Trainer (full fine-tuning and LoRA r=16) at ``logging_steps`` 1, 10 and 50, and Lightning at its
default cadence, each run with and without ``MFUCallback`` on one model, in pairs whose order
alternates from round to round. A run is W warm-up steps then M measured steps; a callback of the
benchmark synchronizes the GPU when the first measured step begins and when the last one ends, and
the host clock between the two syncs is the run's wall time (the same in both variants).

Per case:
- wall with / without: the median over rounds of each pair's ratio, with the smallest and largest;
- one read (``MeterSession.read``, every read after the first): median and p90 of its host time;
- logged MFU / truth: the callback's run MFU (``summary["mfu"]``, all M measured steps) over
  FlopCounterMode's FLOPs of one step (eager attention, on a copy) x M / the wall time / the peak.

    python benchmarks/bench_log_cost.py --rounds 3 --warmup 10 --measured 50
    python benchmarks/bench_log_cost.py --smoke        # a CPU, tiny model: the script runs, no claim
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from bench_accuracy import (
    FixedBatches,
    build,
    hf_arguments,
    hf_wall_clock,
    lightning_module,
    lightning_wall_clock,
    truth_flops_without_recompute,
)
from common import SIZES, batch_for, median_p90

from mfu_callbacks.hardware import resolve_peak

SIZES.setdefault("0.7b", (2048, 12, 16, 8, 5632, 32000, 2048, 4))  # the GPU table's model

CASES = [
    ("hf", "full", 1),
    ("hf", "full", 10),
    ("hf", "full", 50),
    ("hf", "lora", 1),
    ("hf", "lora", 10),
    ("hf", "lora", 50),
    ("lightning", "full", None),  # Lightning's default cadence: log_every_n_steps=50
]


@dataclass
class Case:
    framework: str
    config: str
    logging_steps: int | None
    ratios: list[float] = field(default_factory=list)
    walls: dict[str, list[float]] = field(default_factory=lambda: {"with": [], "without": []})
    reads: list[float] = field(default_factory=list)
    mfu_over_truth: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        interval = "default" if self.logging_steps is None else str(self.logging_steps)
        return f"{self.framework} {self.config}, logging every {interval}"


def timed_reads(callback, reads: list[float]) -> None:
    """Record the host time of the callback's reads (the session's ``read``) but the run's first, which
    describes the setup once for the whole run."""
    session = callback.session
    read = session.read
    calls = [0]

    def timed():
        begin = time.perf_counter()
        try:
            if PROFILE is not None and calls[0] > 0:
                PROFILE.enable()
            return read()
        finally:
            if PROFILE is not None:
                PROFILE.disable()
            calls[0] += 1
            if calls[0] > 1:
                reads.append(time.perf_counter() - begin)

    session.read = timed


def run_hf(model, batch, warmup, measured, logging_steps, with_callback, reads):
    from transformers import Trainer

    from mfu_callbacks.transformers import MFUCallback

    clock: dict[str, float] = {}

    rows = len(batch["input_ids"])
    args = hf_arguments(rows, warmup + measured, logging_steps)
    callback = MFUCallback(warmup_steps=warmup, report=False) if with_callback else None
    if callback is not None:
        timed_reads(callback, reads)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=FixedBatches(batch, rows * (warmup + measured)),
        callbacks=[c for c in (callback, hf_wall_clock(warmup, measured, clock)) if c is not None],
    )
    trainer.train()
    return clock["end"] - clock["begin"], (callback.summary.get("mfu") if callback is not None else None)


def run_lightning(model, batch, warmup, measured, logging_steps, with_callback, reads):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mfu_callbacks.lightning import MFUCallback

    clock: dict[str, float] = {}
    rows = len(batch["input_ids"])
    loader = torch.utils.data.DataLoader(FixedBatches(batch, rows * (warmup + measured)), batch_size=rows)
    callback = MFUCallback(warmup_steps=warmup, report=False) if with_callback else None
    if callback is not None:
        timed_reads(callback, reads)
    trainer = L.Trainer(
        max_steps=warmup + measured,
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        logger=CSVLogger(tempfile.mkdtemp(prefix="mfu-bench-"), name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[c for c in (callback, lightning_wall_clock(warmup, measured, clock)) if c is not None],
    )
    trainer.fit(lightning_module(model), loader)
    return clock["end"] - clock["begin"], (callback.summary.get("mfu") if callback is not None else None)


RUNNERS = {"hf": run_hf, "lightning": run_lightning}
PROFILE: cProfile.Profile | None = None  # --profile-reads: where the reads' host time goes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="0.7b", choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--measured", type=int, default=50)
    parser.add_argument("--cases", default="all", help="comma-separated indices into CASES, or 'all'")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round, few steps (CPU)")
    parser.add_argument("--profile-reads", action="store_true", help="print where the reads' host time went")
    args = parser.parse_args()
    global PROFILE
    PROFILE = cProfile.Profile() if args.profile_reads else None
    if args.smoke:
        args.size, args.rounds, args.warmup, args.measured = "tiny", 1, 2, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    cases = [Case(*case) for case in chosen]
    batch = batch_for(args.size, device)
    models: dict[str, torch.nn.Module] = {}
    truths: dict[str, int] = {}
    dtype = "bf16" if device.type == "cuda" else "fp32"
    peak = resolve_peak(device, dtype) if device.type == "cuda" else None
    peak_flops = peak.flops if peak is not None else None
    for config in sorted({case.config for case in cases}):
        models[config] = build(args.size, config, device)
        truths[config] = truth_flops_without_recompute(models[config], batch)
    import transformers

    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch "
        f"{torch.__version__}; transformers {transformers.__version__}; model {args.size}, "
        f"{args.warmup} warm-up + {args.measured} measured steps, {args.rounds} rounds; peak "
        f"{peak.tflops if peak is not None else 'none'} TFLOP/s",
        flush=True,
    )
    for round_index in range(args.rounds):
        for case in cases:
            runner = RUNNERS[case.framework]
            order = (True, False) if round_index % 2 == 0 else (False, True)
            walls: dict[bool, float] = {}
            for with_callback in order:
                wall, mfu = runner(
                    models[case.config],
                    batch,
                    args.warmup,
                    args.measured,
                    case.logging_steps,
                    with_callback,
                    case.reads,
                )
                walls[with_callback] = wall
                case.walls["with" if with_callback else "without"].append(wall)
                if with_callback and mfu is not None and peak_flops:
                    truth = truths[case.config] * args.measured / wall / peak_flops
                    case.mfu_over_truth.append(mfu / truth)
            case.ratios.append(walls[True] / walls[False])
            print(
                f"round {round_index + 1} {case.name}: with {walls[True] * 1e3:.1f} ms, without "
                f"{walls[False] * 1e3:.1f} ms ({args.measured} steps), ratio {case.ratios[-1]:.4f}"
                + (f", MFU/truth {case.mfu_over_truth[-1]:.4f}" if case.mfu_over_truth else ""),
                flush=True,
            )
    print()
    print(
        "| case | step (ms) | wall with / without: median [min, max] | read median | read p90 | logged MFU / truth [min, max] |"
    )
    print("| --- | ---: | --- | ---: | ---: | --- |")
    for case in cases:
        read_median, p90 = median_p90(case.reads or [float("nan")])
        step = statistics.median(case.walls["without"]) / args.measured * 1e3
        truth = (
            f"{statistics.median(case.mfu_over_truth):.4f} [{min(case.mfu_over_truth):.4f}, "
            f"{max(case.mfu_over_truth):.4f}]"
            if case.mfu_over_truth
            else "no peak"
        )
        print(
            f"| {case.name} | {step:.1f} | {statistics.median(case.ratios):.4f} [{min(case.ratios):.4f}, "
            f"{max(case.ratios):.4f}] | {read_median * 1e3:.3f} ms | {p90 * 1e3:.3f} ms | {truth} |"
        )
    if PROFILE is not None:
        pstats.Stats(PROFILE).sort_stats("cumulative").print_stats(40)
        pstats.Stats(PROFILE).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
