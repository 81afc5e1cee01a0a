"""Logged MFU of each integration against an independent truth, and proof of no host syncs.

For each integration (plain loop with ``MFUMeter``, HF Trainer, Lightning, Accelerate) and each
configuration (full fine-tuning, LoRA, each with and without gradient checkpointing, and an MoE
model), W warm-up steps then M measured steps run; the integration logs MFU once, for exactly the
M measured steps. The truth for the same steps is FlopCounterMode's FLOPs of one step (eager
attention and experts, no recompute) x M / the wall time of the M steps (one sync before, one
after) / the peak. Beside it: the MFU that 6·N·tokens (HF Trainer's ``total_flos``) gives, and
what Lightning's ``measure_flops`` (the FLOPs ThroughputMonitor is fed) gives, or its error.

Every call of the meter on the hot path (``start_step``, ``add_batch``, ``end_step``) runs under
``torch.cuda.set_sync_debug_mode("error")``: a host sync there raises, the callback goes quiet,
and the row shows no MFU. The plain loop runs entirely in that mode between two metric reads.

    python benchmarks/bench_accuracy.py --size mid --warmup 5 --measured 20
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import tempfile
import time
from pathlib import Path

import torch
from common import SIZES, batch_for, llama, six_n_tokens, truth_step_flops

from mfu_callbacks import MFUMeter
from mfu_callbacks.hardware import resolve_peak

CONFIGS = ("full", "lora", "full+ckpt", "lora+ckpt", "moe")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def sync_debug(mode: str):
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def forbid_syncs_in_meter_hot_path() -> None:
    """Wrap the meter's per-step methods so that any host sync inside them raises."""
    for name in ("start_step", "add_batch", "end_step"):
        original = getattr(MFUMeter, name)
        if getattr(original, "_sync_checked", False):
            continue

        @functools.wraps(original)
        def checked(self, *args, _original=original, **kwargs):
            with sync_debug("error"):
                return _original(self, *args, **kwargs)

        checked._sync_checked = True
        setattr(MFUMeter, name, checked)


def build(size: str, config: str, device: torch.device) -> torch.nn.Module:
    model = llama(size, moe=config == "moe").to(device)
    if "lora" in config:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if "ckpt" in config:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if "lora" in config:
            model.enable_input_require_grads()
    model.train()
    return model


def truth_flops_without_recompute(model: torch.nn.Module, batch) -> int:
    was = getattr(model, "is_gradient_checkpointing", False)
    if was:
        model.gradient_checkpointing_disable()
    try:
        return truth_step_flops(model, batch)
    finally:
        if was:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lightning_measure_flops(model, batch) -> str | int:
    from lightning.fabric.utilities.throughput import measure_flops

    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            flops = measure_flops(model, lambda: model(**batch).loss, lambda loss: loss)
        model.zero_grad(set_to_none=True)
        return flops
    except Exception as error:  # noqa: BLE001 - reported in the table
        model.zero_grad(set_to_none=True)
        return f"error: {type(error).__name__}: {str(error)[:60]}"


class FixedBatches(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor], rows: int) -> None:
        self.rows = {k: v.cpu() for k, v in batch.items()}
        self.size = rows

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = index % len(self.rows["input_ids"])
        return {k: v[i] for k, v in self.rows.items()}


# -- the four ways of training ------------------------------------------------------------------
def run_plain(model, batch, warmup, measured, peak_tflops):
    meter = MFUMeter(model, warmup_steps=warmup, peak_tflops=peak_tflops)
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-5)
    wall = 0.0
    for step in range(warmup + measured):
        if step == warmup:
            meter.metrics()
            sync()
            begin = time.perf_counter()
            torch.cuda.set_sync_debug_mode("error") if torch.cuda.is_available() else None
        meter.start_step(batch)
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step()
    torch.cuda.set_sync_debug_mode(0) if torch.cuda.is_available() else None
    sync()
    wall = time.perf_counter() - begin
    return meter.metrics(), wall


def run_hf(model, batch, warmup, measured, peak_tflops):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mfu_callbacks.transformers import MFUCallback

    clock = {}

    class WallClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync()
                clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + measured:
                sync()
                clock["end"] = time.perf_counter()

    rows = len(batch["input_ids"])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=warmup + measured, per_device_train_batch_size=rows,
                             logging_steps=warmup + measured, bf16=torch.cuda.is_available(), report_to=[],
                             save_strategy="no", disable_tqdm=True, learning_rate=1e-5, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=FixedBatches(batch, rows * (warmup + measured)),
                      callbacks=[MFUCallback(warmup_steps=warmup, peak_tflops=peak_tflops), WallClock()])
    trainer.train()
    logged = next(row for row in trainer.state.log_history if "loss" in row)
    metrics = {k: v for k, v in logged.items() if k in ("mfu", "hfu", "tflops_per_gpu", "step_time")}
    return metrics, clock["end"] - clock["begin"]


def run_lightning(model, batch, warmup, measured, peak_tflops):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mfu_callbacks.lightning import MFUCallback

    clock = {}

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, b, batch_idx):
            loss = self.model(**b).loss
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-5)

    class WallClock(L.Callback):
        def on_train_batch_start(self, trainer, module, b, batch_idx):
            if trainer.global_step == warmup:
                sync()
                clock["begin"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, b, batch_idx):
            if trainer.global_step == warmup + measured:
                sync()
                clock["end"] = time.perf_counter()

    rows = len(batch["input_ids"])
    loader = torch.utils.data.DataLoader(FixedBatches(batch, rows * (warmup + measured)), batch_size=rows)
    logs = tempfile.mkdtemp()
    trainer = L.Trainer(max_steps=warmup + measured, accelerator="auto", devices=1,
                        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
                        log_every_n_steps=warmup + measured, logger=CSVLogger(logs, name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MFUCallback(warmup_steps=warmup, peak_tflops=peak_tflops), WallClock()])
    trainer.fit(Module(), loader)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("train/step_time"))
    metrics = {k.split("/")[1]: float(v) for k, v in row.items() if v and k.startswith("train/") and k != "train/loss"}
    return metrics, clock["end"] - clock["begin"]


def run_accelerate(model, batch, warmup, measured, peak_tflops):
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-5)
    rows = len(batch["input_ids"])
    loader = torch.utils.data.DataLoader(FixedBatches(batch, rows * (warmup + measured)), batch_size=rows)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = MFUTracker(accelerator, model, warmup_steps=warmup, log_interval=warmup + measured, peak_tflops=peak_tflops)
    for step, b in enumerate(loader):
        if step == warmup:
            sync()
            begin = time.perf_counter()
        with accelerator.accumulate(model):
            loss = model(**b).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    sync()
    wall = time.perf_counter() - begin
    return {k.split("/")[1]: v for k, v in tracker.latest.items()}, wall


RUNNERS = {"plain": run_plain, "hf_trainer": run_hf, "lightning": run_lightning, "accelerate": run_accelerate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--integrations", default=",".join(RUNNERS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="needed on a CPU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    forbid_syncs_in_meter_hot_path()
    peak_info = resolve_peak(device, "bf16" if device.type == "cuda" else "fp32", override_tflops=args.peak_tflops)
    peak = peak_info.flops
    import accelerate
    import lightning
    import peft
    import transformers

    print(f"device: {peak_info.device_name}; peak {peak / 1e12:.1f} TFLOP/s ({peak_info.source}); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, lightning {lightning.__version__}, accelerate {accelerate.__version__}, "
          f"peft {peft.__version__}; model {args.size}, {args.warmup} warm-up + {args.measured} measured steps")
    header = f"{'integration':<12} {'config':<10} {'truth MFU':>9} {'ours':>8} {'ours/truth':>10} {'6N MFU':>8} {'measure_flops MFU':>20} {'sync-free':>9}"
    print(header)
    results = []
    for config in args.configs.split(","):
        for integration in args.integrations.split(","):
            model = build(args.size, config, device)
            batch = batch_for(args.size, device)
            truth = truth_flops_without_recompute(model, batch)
            six_n = six_n_tokens(model, batch)
            measured_flops = lightning_measure_flops(model, batch)
            metrics, wall = RUNNERS[integration](model, batch, args.warmup, args.measured, args.peak_tflops)
            truth_mfu = truth * args.measured / wall / peak
            ours = metrics.get("mfu")
            lightning_mfu = (f"{measured_flops * args.measured / wall / peak:.4f}" if isinstance(measured_flops, int)
                             else measured_flops[:20])
            row = (f"{integration:<12} {config:<10} {truth_mfu:>9.4f} {ours if ours is None else f'{ours:.4f}':>8} "
                   f"{'' if ours is None else f'{ours / truth_mfu:.4f}':>10} {six_n * args.measured / wall / peak:>8.4f} "
                   f"{lightning_mfu:>20} {'yes' if ours is not None else 'NO':>9}")
            print(row, flush=True)
            results.append(row)
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
