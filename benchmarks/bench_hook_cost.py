"""Where the meter's host time is paid in a real run: each ``MFUCallback`` hook of an HF Trainer run, and
the CUDA calls the hooks make, timed one by one on this host.

Part 1, the CUDA calls: the host time of each call the meter makes per step or per read (an event
record, a query, an elapsed time, a copy of a batch tensor on the device or to pinned host memory, a
side stream's wait, a ten-step window's held tensors brought to the host with a kernel and one copy or
with ten copies), median over many calls, while the GPU works through a queue of matmuls and while
it idles.

Part 2, a training step between two calls: the session's step with and without a read of a tiny
model, the CUDA calls of a step (a mask's row sums, two events), a fixed piece of pure Python and ten
small torch operations, timed back to back and right after a training step (the step fills the host's
caches, and every call after it runs slower).

Part 3, the hooks: an HF Trainer run (the GPU table's 0.7B model, full fine-tuning and LoRA r=16, a log
at every step) with the callback's hooks wrapped in a host clock: median and p90 of each hook's time
per step (the read is in the flow's ``on_step_end``), and their sum per step.

    python benchmarks/bench_hook_cost.py --steps 40
    python benchmarks/bench_hook_cost.py --smoke       # a CPU, tiny model: the script runs, no claim
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch
from bench_accuracy import FixedBatches, build, hf_arguments
from common import SIZES, batch_for, median_p90

SIZES.setdefault("0.7b", (2048, 12, 16, 8, 5632, 32000, 2048, 4))  # the GPU table's model


def call_costs(device: torch.device, calls: int) -> None:
    """Host microseconds of each CUDA call of the meter, with the GPU busy and idle."""
    mask = torch.ones(4, 2048, dtype=torch.int64, device=device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    for event in events:
        event.record()
    side = torch.cuda.Stream(device, priority=-1)
    big = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()

    def done_copy() -> torch.Tensor:
        with torch.cuda.stream(side):
            return mask.cpu()

    lengths = [mask.sum(1) for _ in range(10)]  # what ten steps of a window hold

    def cat_and_copy() -> torch.Tensor:
        with torch.cuda.stream(side):
            side.wait_event(events[2])
            return torch.cat(lengths).cpu()

    def copies_and_sync() -> torch.Tensor:
        with torch.cuda.stream(side):
            side.wait_event(events[2])
            copies = [held.to("cpu", non_blocking=True) for held in lengths]
            side.synchronize()
            return torch.cat(copies)

    probes: dict[str, Callable[[], object]] = {
        "Event.record": lambda: events[0].record(),
        "Event.query (passed)": lambda: events[1].query(),
        "Event.elapsed_time": lambda: events[1].elapsed_time(events[2]),
        "current_stream": lambda: torch.cuda.current_stream(device),
        "mask.clone (device)": lambda: mask.clone(),
        "mask.to(cpu, non_blocking)": lambda: mask.to("cpu", non_blocking=True),
        "side stream wait_event": lambda: side.wait_event(events[2]),
        "side stream: mask.cpu()": done_copy,
        "mask.sum(1) (device)": lambda: mask.sum(1),
        "side: cat of ten, one copy": cat_and_copy,
        "side: ten copies, one sync": copies_and_sync,
    }
    for busy in (True, False):
        print(f"-- CUDA calls, GPU {'busy (a queue of matmuls)' if busy else 'idle'}: host µs, median / p90")
        for name, probe in probes.items():
            samples = []
            for index in range(calls):
                if busy and index % 20 == 0:
                    for _ in range(20):
                        big @ big  # about 0.2 ms each on an H100: the queue stays ahead of the host
                begin = time.perf_counter()
                probe()
                samples.append((time.perf_counter() - begin) * 1e6)
                if not busy and index % 20 == 0:
                    torch.cuda.synchronize()
            if name == "Event.record":
                torch.cuda.synchronize()
                for event in events:
                    event.record()
                torch.cuda.synchronize()
            median, p90 = median_p90(samples[5:])
            print(f"   {name:30} {median:8.1f} {p90:8.1f}")
        torch.cuda.synchronize()


def hook_costs(size: str, config: str, steps: int, device: torch.device) -> None:
    """Host time of each hook of MFUCallback per step, in an HF Trainer run that logs every step."""
    from transformers import Trainer

    import mfu_callbacks.transformers as integration
    from mfu_callbacks.transformers import MFUCallback

    times: dict[str, list[float]] = {}

    def timed(target: object, name: str, key: str) -> None:
        hook = getattr(target, name)

        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                times.setdefault(key, []).append((time.perf_counter() - begin) * 1e6)

        setattr(target, name, wrapper)

    flow_init = integration._AfterTheFlow.__init__

    def init(self, owner):
        flow_init(self, owner)
        timed(self, "on_step_end", "read (flow's on_step_end)")
        timed(self, "on_log", "flow's on_log")

    integration._AfterTheFlow.__init__ = init
    try:
        callback = MFUCallback(warmup_steps=3, report=False)
    finally:
        integration._AfterTheFlow.__init__ = flow_init
    for name in ("on_step_begin", "on_step_end", "on_log"):
        timed(callback, name, name)
    model = build(size, config, device)
    batch = batch_for(size, device)
    rows = len(batch["input_ids"])
    trainer = Trainer(
        model=model,
        args=hf_arguments(rows, steps, logging_steps=1),
        train_dataset=FixedBatches(batch, rows * steps),
        callbacks=[callback],
    )
    begin = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - begin
    print(
        f"-- hooks, HF Trainer {config}, logging every step, {steps} steps ({wall / steps * 1e3:.1f} ms/step)"
    )
    total = 0.0
    for key, samples in times.items():
        median, p90 = median_p90(samples[5:])
        total += median
        print(f"   {key:28} median {median:8.1f} µs   p90 {p90:8.1f} µs")
    print(f"   {'sum of the medians':28} {total:8.1f} µs per step; mfu {callback.summary.get('mfu')}")


def cold_host(device: torch.device, reads: int) -> None:
    """What a training step between two calls does to their host time: the session's step (its begin and
    end) with and without a read on a tiny model, the CUDA calls of a step one by one, a fixed piece of
    pure Python and ten small torch operations, each timed alone (back to back) and right after a
    training step of that model."""
    from mfu_callbacks.testing import causal_lm
    from mfu_callbacks.transformers import MFUCallback

    model = causal_lm(hidden=64, layers=2, heads=4, vocab=256, max_positions=64).to(device)
    ids = torch.randint(3, 256, (4, 64), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    small = torch.ones(4, 64, device=device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else []

    def python() -> None:
        table = {str(i): (i, 2.0 * i) for i in range(300)}
        sum(value[1] for value in table.values())

    def torch_ops() -> None:
        for _ in range(10):
            small.sum(1)

    def two_events() -> None:  # as the step timer records them
        for event in events:
            event.record(torch.cuda.current_stream(device))

    calls: dict[str, Callable[[], None] | None] = {
        "a step's begin, end and read": None,
        "a step's begin and end": None,
        "300 dict inserts in Python": python,
        "ten small torch operations": torch_ops,
        "a mask's row sums (the count)": lambda: batch["attention_mask"].sum(1, dtype=torch.int64),
    }
    if events:
        calls["two events (the step's start and stop)"] = two_events
    print("-- a training step between two calls: host µs, median alone / after a step")
    for name, call in calls.items():
        medians = []
        for train in (False, True):
            session = MFUCallback(warmup_steps=1, peak_tflops=100.0, report=False).session
            session.attach(model, dtype="fp32")
            read = name.endswith("read")
            samples = []
            for _ in range(reads):
                session.begin_step(batch)
                if train:
                    model(**batch).loss.backward()
                session.end_step()
                if read:
                    session.read()  # every step is read: the next read holds one step
                begin = time.perf_counter()
                if call is None:
                    session.begin_step(batch)
                    session.end_step()
                    if read:
                        session.read()
                else:
                    call()
                samples.append((time.perf_counter() - begin) * 1e6)
            medians.append(median_p90(samples[reads // 5 :])[0])
        print(f"   {name:36} {medians[0]:8.1f} {medians[1]:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="0.7b", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--configs", default="full,lora")
    parser.add_argument("--reads", type=int, default=300, help="reads of the tiny model in part 2")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU)")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.reads = "tiny", 12, 60
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}"
    )
    if device.type == "cuda":
        call_costs(device, args.calls)
    cold_host(device, args.reads)
    for config in filter(None, args.configs.split(",")):  # --configs "": parts 1 and 2 only
        hook_costs(args.size, config, args.steps, device)


if __name__ == "__main__":
    main()
