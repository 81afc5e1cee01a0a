"""Counting the real step on a GPU: logged MFU against an independent truth, and what observing costs.

1. TRL ``SFTTrainer`` (its defaults: bf16, gradient checkpointing, its fused LM head) with full
   fine-tuning, LoRA and packing, on rows of random lengths. The meta-device copy cannot run TRL's
   patched forward, so the callback counts the real step. The truth of the same measured steps:
   FlopCounterMode's FLOPs of each measured batch, every document alone (no padding, no recompute,
   eager attention), summed, over the wall time of those steps (one sync before, one after).
2. A hand-written top-k MoE (routing through ``torch.where``, which the copy cannot run) in a plain
   loop with ``MFUMeter``; the truth is FlopCounterMode's count of a step (dropless top-k: every step
   routes k x tokens).
3. The one-off cost of observing a step, by model size: the observed step's time against the median
   of plain steps, and the host syncs it caused (must be none).

    python benchmarks/bench_real_step.py --size mid --warmup 5 --measured 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from common import SIZES, llama, sync
from torch import nn

from mfu_callbacks import MFUMeter
from mfu_callbacks.flops import observe_step, token_counting
from mfu_callbacks.hardware import resolve_peak
from mfu_callbacks.testing import make_eager, moe_lm, reference_step_flops, word_tokenizer


def documents(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each real sequence of a batch alone: rows by their attention mask, packed rows where positions restart."""
    pieces = []
    if "position_ids" in batch and "attention_mask" not in batch:
        positions = batch["position_ids"]
        for row in range(positions.shape[0]):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [positions.shape[1]]
            for start, end in zip(starts[:-1], starts[1:]):
                pieces.append({k: batch[k][row : row + 1, start:end] for k in ("input_ids", "labels")})
        return pieces
    mask = batch["attention_mask"].bool()
    for row in range(mask.shape[0]):
        pieces.append({k: batch[k][row : row + 1][:, mask[row]] for k in ("input_ids", "labels")})
    return pieces


def truth_of_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> int:
    """Model FLOPs of the batches: each document alone through an eager copy of the plain model, bf16."""
    reference = make_eager(_plain_copy(model))
    dtype = torch.bfloat16 if torch.cuda.is_available() else None
    return sum(
        reference_step_flops(reference, piece, autocast_dtype=dtype)
        for b in batches
        for piece in documents(b)
    )


def _plain_copy(model: nn.Module) -> nn.Module:
    """The model without TRL's instance-level forward (the plain forward scores every position)."""
    import copy

    copied = copy.deepcopy(model)
    for module in copied.modules():
        module.__dict__.pop("forward", None)
    if hasattr(copied, "gradient_checkpointing_disable"):
        copied.gradient_checkpointing_disable()
    return copied


# -- 1. TRL SFTTrainer ---------------------------------------------------------------------------------
def run_trl(size: str, setup: str, warmup: int, measured: int, peak_tflops: float | None) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mfu_callbacks.transformers import MFUCallback

    _, _, _, _, _, vocab, seq_len, rows = SIZES[size]
    generator = torch.Generator().manual_seed(0)
    steps = warmup + measured
    lengths = torch.randint(seq_len // 4, seq_len, (rows * steps * 2,), generator=generator).tolist()
    data = Dataset.from_list(
        [{"input_ids": torch.randint(3, vocab, (n,), generator=generator).tolist()} for n in lengths]
    )
    model = llama(size)
    seen: list[dict[str, torch.Tensor]] = []
    clock: dict[str, float] = {}

    def keep(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    class WallClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync()
                clock["begin"], clock["first"] = time.perf_counter(), len(seen)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                sync()
                clock["end"], clock["last"] = time.perf_counter(), len(seen)

    model.register_forward_pre_hook(keep, with_kwargs=True)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=rows,
        logging_steps=steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_length=seq_len,
        packing=setup == "packing",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    lora = LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM") if setup == "lora" else None
    callback = MFUCallback(warmup_steps=warmup, peak_tflops=peak_tflops)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=word_tokenizer(vocab),
        callbacks=[callback, WallClock()],
        peft_config=lora,
    )
    trainer.train()
    logged = next(row for row in trainer.state.log_history if "loss" in row)
    measured_batches = seen[clock["first"] : clock["last"]]
    truth = truth_of_batches(trainer.model, measured_batches)
    peak = peak_tflops * 1e12 if peak_tflops else _peak()
    truth_mfu = truth / (clock["end"] - clock["begin"]) / peak
    engine = callback.session.meter.engine
    return {
        "run": f"TRL SFTTrainer {setup}",
        "counted from": "real step"
        if engine is not None and "real training step" in engine.description
        else "copy",
        "logged mfu": logged.get("mfu"),
        "truth mfu": truth_mfu,
        "ratio": logged.get("mfu", float("nan")) / truth_mfu,
        "rows with mfu": sum("mfu" in row for row in trainer.state.log_history if "loss" in row),
    }


# -- 2. hand-written top-k MoE -------------------------------------------------------------------------
def run_moe(size: str, warmup: int, measured: int, peak_tflops: float | None) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, _, _, _, _, vocab, seq_len, rows = SIZES[size]
    hidden, layers, _, _, inner, _, _, _ = SIZES[size]
    model = moe_lm(vocab=vocab, hidden=hidden, inner=inner // 2, layers=layers, experts=8, top_k=2).to(device)
    ids = torch.randint(0, vocab, (rows, seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meter = MFUMeter(
        model, warmup_steps=warmup, peak_tflops=peak_tflops, dtype="bf16" if device.type == "cuda" else "fp32"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    begin = 0.0
    for step in range(warmup + measured):
        if step == warmup:
            sync()
            begin = time.perf_counter()
        meter.start_step(batch)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step()
    sync()
    wall = time.perf_counter() - begin
    logged = meter.metrics()
    truth = reference_step_flops(
        model, batch, lambda m, b: m(**b), autocast_dtype=dtype if device.type == "cuda" else None
    )
    peak = meter.peak.flops if meter.peak is not None else _peak()
    truth_mfu = truth * measured / wall / peak
    return {
        "run": "hand-written top-2 MoE (plain loop)",
        "counted from": "real step"
        if meter.engine is not None and "real training step" in meter.engine.description
        else "copy",
        "logged mfu": logged.get("mfu"),
        "truth mfu": truth_mfu,
        "ratio": logged.get("mfu", float("nan")) / truth_mfu,
        "rows with mfu": int("mfu" in logged),
    }


# -- 3. the cost of observing a step --------------------------------------------------------------------
def observing_cost(size: str, steps: int = 8) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = llama(size).to(device)
    _, _, _, _, _, vocab, seq_len, rows = SIZES[size]
    ids = torch.randint(0, vocab, (rows, seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    counting = token_counting(model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step(observed: bool) -> tuple[float, int]:
        sync()
        start = time.perf_counter()
        syncs = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            observer = observe_step(model, batch, counting) if observed else None
            if observer is not None:
                observer.__enter__()
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = model(**batch).loss
            loss.backward()
            if observer is not None:
                observer.__exit__(None, None, None)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            syncs = sum("mfu_callbacks" in str(w.filename) for w in caught)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, syncs

    for _ in range(3):
        step(False)
    plain = statistics.median(step(False)[0] for _ in range(steps))
    observed, syncs = step(True)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "size": size,
        "parameters": f"{parameters / 1e6:.0f}M",
        "plain step ms": 1000 * plain,
        "observed step ms": 1000 * observed,
        "one-off cost ms": 1000 * (observed - plain),
        "host syncs by mfu_callbacks": syncs,
    }


def _peak() -> float:
    peak = resolve_peak(torch.device("cuda"), "bf16") if torch.cuda.is_available() else None
    if peak is None:
        raise SystemExit("no known peak for this device: pass --peak-tflops")
    return peak.flops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--trl", default="full,lora,packing")
    parser.add_argument("--cost-sizes", default="small,mid,1b")
    parser.add_argument("--peak-tflops", type=float, default=None, help="needed on a CPU")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"device: {device}; torch {torch.__version__}; size {args.size}; {args.warmup} warm-up + {args.measured} measured steps"
    )
    rows = [
        run_trl(args.size, setup, args.warmup, args.measured, args.peak_tflops)
        for setup in args.trl.split(",")
        if setup
    ]
    rows.append(run_moe(args.size, args.warmup, args.measured, args.peak_tflops))
    print(
        f"\n{'run':40} {'counted from':13} {'logged MFU':>11} {'truth MFU':>10} {'ratio':>8} {'rows with mfu':>14}"
    )
    for row in rows:
        print(
            f"{row['run']:40} {row['counted from']:13} {row['logged mfu'] or float('nan'):11.4f} "
            f"{row['truth mfu']:10.4f} {row['ratio']:8.4f} {row['rows with mfu']:14d}"
        )
    print(
        f"\n{'size':6} {'parameters':>10} {'plain step ms':>14} {'observed step ms':>17} {'one-off cost ms':>16} {'syncs':>6}"
    )
    for size in args.cost_sizes.split(","):
        cost = observing_cost(size)
        print(
            f"{cost['size']:6} {cost['parameters']:>10} {cost['plain step ms']:14.1f} {cost['observed step ms']:17.1f} "
            f"{cost['one-off cost ms']:16.1f} {cost['host syncs by mfu_callbacks']:6d}"
        )


if __name__ == "__main__":
    main()
