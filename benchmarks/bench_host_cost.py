"""Host cost of counting micro-batches, per batch layout: operations on the training step and at the read.

For each layout of the GPU table (padded rows, packed rows with ``position_ids``, packed rows with
``cu_seq_lens``, encoder-decoder), the meter's per-step path with its real token counting:
``start_step(batch)`` + ``end_step()`` of an ``MFUMeter`` whose FLOP engine is built from the model
config, timed over many steps (no GPU work in between, so only the host cost shows). A dispatch mode
lists the aten operations of one step (views included: on a GPU host each dispatch costs host time)
and of a read (``metrics()``), whose operations are amortized per step for a read every 10 and every
50 steps; the read's host time is its median over reads. Medians and p90 in microseconds.

These are the calls' cost back to back. In a training loop (``bench_overhead.py``'s per-step line) the
same calls cost 3-5 times more, right after a step has filled the host's caches; ``bench_hook_cost.py``
(part 2) times each of them both ways, which reconciles the two benchmarks.

    python benchmarks/bench_host_cost.py --steps 2000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from mfu_callbacks import MFUMeter
from mfu_callbacks.testing import OperationLog, causal_lm

VIEWS = {"aten.view", "aten.unsqueeze", "aten.select", "aten.slice", "aten._to_copy", "aten.reshape"}


def layouts(device: torch.device, rows: int = 4, length: int = 2048) -> dict[str, tuple[nn.Module, dict]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (rows, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    documents = [length // 4, length // 2, length // 8, length - length // 4 - length // 2 - length // 8]
    positions = torch.cat([torch.arange(n) for n in documents])[None, :]
    bounds = torch.tensor([0, *torch.tensor(documents).cumsum(0).tolist()], dtype=torch.int32)
    flat = ids[:1]
    decoder = causal_lm(hidden=64, layers=2, heads=4, vocab=32000, max_positions=length)
    from transformers import T5Config, T5ForConditionalGeneration

    seq2seq = T5ForConditionalGeneration(
        T5Config(
            vocab_size=32000,
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            d_kv=16,
            decoder_start_token_id=0,
        )
    )
    on = {
        k: v.to(device) for k, v in {"ids": ids, "mask": mask, "positions": positions, "flat": flat}.items()
    }
    return {
        "padded rows": (decoder, {"input_ids": on["ids"], "attention_mask": on["mask"], "labels": on["ids"]}),
        "packed, position_ids": (
            decoder,
            {"input_ids": on["flat"], "position_ids": on["positions"], "labels": on["flat"]},
        ),
        "packed, cu_seq_lens": (
            decoder,
            {
                "input_ids": on["flat"],
                "position_ids": on["positions"],
                "cu_seq_lens_q": bounds.to(device),
                "cu_seq_lens_k": bounds.to(device),
                "labels": on["flat"],
            },
        ),
        "encoder-decoder": (
            seq2seq,
            {
                "input_ids": on["ids"],
                "attention_mask": on["mask"],
                "labels": on["ids"][:, : length // 4],
            },
        ),
    }


def operations_of(action) -> tuple[int, int]:
    """Aten operations ``action`` dispatches, and those of them that are not views."""
    with OperationLog() as log:
        action()
    return len(log.operations), len([name for name in log.operations if name not in VIEWS])


def measure(model: nn.Module, batch: dict, device: torch.device, steps: int) -> dict[str, float]:
    model.to(device)
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, real_step="off", device=device)
    meter.start_step(batch)  # builds the engine
    meter.end_step()
    meter.metrics()

    def step() -> None:
        meter.start_step(batch)
        meter.end_step()

    for _ in range(3):  # the layout's plan is made
        step()
    meter.metrics()
    result: dict[str, float] = {}
    result["step ops"], result["step kernels"] = operations_of(step)
    for every in (10, 50):
        for _ in range(every):
            step()
        read_ops, _ = operations_of(meter.metrics)
        result[f"read ops/step @{every}"] = read_ops / every
    _sync(device)
    times, reads = [], []
    for index in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if index % 50 == 49:  # a read now and then, as a logger would (timed apart)
            start = time.perf_counter()
            meter.metrics()
            reads.append(time.perf_counter() - start)
    times.sort()
    result["median"] = 1e6 * statistics.median(times)
    result["p90"] = 1e6 * times[int(0.9 * len(times))]
    result["read"] = 1e6 * statistics.median(reads)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger("mfu_callbacks").setLevel(logging.ERROR)  # diagnoses of a loop that does no work
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} steps per layout; start_step + end_step")
    print(
        f"{'layout':22} {'step ops':>8} {'kernels':>7} {'read ops/step @10':>17} {'@50':>5} "
        f"{'median µs':>9} {'p90 µs':>7} {'read µs (50 steps)':>18}"
    )
    for layout, (model, batch) in layouts(device).items():
        r = measure(model, batch, device, args.steps)
        print(
            f"{layout:22} {r['step ops']:8.0f} {r['step kernels']:7.0f} {r['read ops/step @10']:17.1f} "
            f"{r['read ops/step @50']:5.2f} {r['median']:9.1f} {r['p90']:7.1f} {r['read']:18.1f}"
        )


if __name__ == "__main__":
    main()
