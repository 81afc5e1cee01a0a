"""What the meter costs a training step on the host, and proof that it never waits for the GPU.

    python benchmarks/bench_meter_overhead.py

1. Host cost of ``start_step`` + ``end_step`` over 10,000 steps on the host-clock path, with no
   batch and with a batch counted by a FLOP engine that does no work (so only the meter's own
   bookkeeping is measured): median and p90 in microseconds.
2. On a CUDA machine: the same on the CUDA-event path, then a loop of small matmul training steps
   with the meter and its real FLOP engine under ``torch.cuda.set_sync_debug_mode("error")``
   between two ``metrics()`` calls: any host sync raises, so the loop finishing is the proof.
   Without a GPU this part is skipped with a note.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mfu_callbacks.flops.features import NUM_FEATURES
from mfu_callbacks.flops.step_flops import StepFlops
from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.timer import StepTimer

STEPS = 10_000
READ_EVERY = 1_000  # steps between two metrics() calls, as a logger would (not timed)
SYNC_CHECK_STEPS = 50


class IdleEngine:
    """The FlopEngine interface doing no work: ``count`` hands back one ready tensor."""

    def __init__(self, device: torch.device) -> None:
        self.features = torch.ones(2, NUM_FEATURES, dtype=torch.int64, device=device)

    def count(self, batch: Any) -> torch.Tensor:
        return self.features

    def evaluate(self, features: torch.Tensor) -> StepFlops:
        return StepFlops(0, 0, 1, 1)


@dataclass(frozen=True)
class BenchPeak:
    """A PeakInfo stand-in, so the benchmark needs no peak table."""

    flops: float = 989.4e12
    device_name: str = "benchmark"
    dtype: str = "bf16"
    source: str = "benchmark"


def host_cost_us(meter: MFUMeter, batch: Any) -> tuple[float, float]:
    """Median and p90 of start_step(batch) + end_step(), in microseconds."""
    samples = []
    for step in range(STEPS):
        begin = time.perf_counter_ns()
        meter.start_step(batch)
        meter.end_step()
        samples.append(time.perf_counter_ns() - begin)
        if (step + 1) % READ_EVERY == 0:
            meter.metrics()
    deciles = statistics.quantiles(samples, n=10)
    return statistics.median(samples) / 1e3, deciles[8] / 1e3


def report_host_cost(device: torch.device, force_cpu: bool) -> None:
    path = "host clock" if force_cpu else "CUDA events"
    for label, batch in (("no batch", None), ("one batch counted", object())):
        meter = MFUMeter(
            nn.Linear(2, 2).to(device),
            engine=IdleEngine(device),
            peak=BenchPeak(),
            device=device,
            timer=StepTimer(2, device=device, force_cpu=force_cpu),
        )
        median, p90 = host_cost_us(meter, batch)
        print(f"  {path:11s} {label:18s} median {median:6.2f} us   p90 {p90:6.2f} us")


class SmallModel(nn.Module):
    """A frozen embedding and a few matmuls: steps of small kernels, where a host sync would show most."""

    def __init__(self, vocab: int = 4096, width: int = 1024) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.embed.weight.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(self.embed(input_ids)))


def sync_check() -> bool:
    """Train SYNC_CHECK_STEPS steps with the meter under sync-debug "error"; True when nothing synced."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = SmallModel().to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 4096, (8, 256), device=device)
    mask = torch.ones_like(ids)
    mask[:, 200:] = 0  # some padding, so the token count has work to do
    batch = {"input_ids": ids, "attention_mask": mask}
    meter = MFUMeter(model, peak=BenchPeak(), warmup_steps=2)

    def train_step() -> None:
        meter.start_step(batch)
        loss = model(**batch).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step()

    for _ in range(4):  # warm-up; the first batch builds the FLOP engine
        train_step()
    meter.metrics()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_CHECK_STEPS):
            train_step()
    except RuntimeError as error:
        print(f"  host sync inside the step loop: {error}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics = meter.metrics()
    print(
        f"  {SYNC_CHECK_STEPS} steps: step_time {metrics['step_time'] * 1e3:.3f} ms, "
        f"tflops_per_gpu {metrics['tflops_per_gpu']:.2f}, padding_fraction {metrics['padding_fraction']:.4f}"
    )
    return metrics["padding_fraction"] > 0


def main() -> int:
    print(f"torch {torch.__version__}; {STEPS} steps per case")
    print("host cost of start_step + end_step:")
    report_host_cost(torch.device("cpu"), force_cpu=True)
    if not torch.cuda.is_available():
        print("no CUDA device: the CUDA-event host cost and the no-host-sync check were skipped")
        return 0
    print(f"on {torch.cuda.get_device_name()}:")
    report_host_cost(torch.device("cuda", torch.cuda.current_device()), force_cpu=False)
    passed = sync_check()
    print(f"no host sync between two metrics() calls: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
