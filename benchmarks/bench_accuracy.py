"""Logged MFU of each integration against an independent truth, and proof of no host syncs.

For each integration (plain loop with ``MFUMeter``, HF Trainer, Lightning, Accelerate) and each
configuration (full fine-tuning, LoRA, each with and without gradient checkpointing, and an MoE
model), W warm-up steps then M measured steps run; the integration logs MFU once, for exactly the
M measured steps. The truth for the same steps is FlopCounterMode's FLOPs of one step (eager
attention and experts, no recompute) x M / the wall time of the M steps (one sync before, one
after) / the peak. Beside it: the MFU that 6·N·tokens (HF Trainer's ``total_flos``) gives, and
what Lightning's ``measure_flops`` (the FLOPs ThroughputMonitor is fed) gives, or its error.

Every run is under ``torch.cuda.set_sync_debug_mode("warn")``; the table counts the host syncs
caused by a line of ``mfu_callbacks`` outside its log-time reads (must be 0), those of the reads,
and the framework's own per step. A loop of pure PyTorch runs under mode "error" between two reads.

    python benchmarks/bench_accuracy.py --size mid --warmup 5 --measured 20
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import SIZES, batch_for, llama, six_n_tokens, sync, truth_step_flops

from mfu_callbacks import FlopEngine, MFUMeter
from mfu_callbacks.hardware import resolve_peak

CONFIGS = ("full", "lora", "full+ckpt", "lora+ckpt", "moe")


class SyncLedger:
    """Every host sync of a run, by who caused it: our hot path, our log-time reads, or the rest.

    Runs under ``torch.cuda.set_sync_debug_mode("warn")``: each sync raises a warning whose file is
    the Python line that caused it. A sync in a file of ``mfu_callbacks`` outside ``metrics()`` or
    ``summary()`` would be a per-step cost of measuring, and the table shows it.
    """

    def __init__(self) -> None:
        self.records: list[warnings.WarningMessage] = []
        self.read_ranges: list[tuple[int, int]] = []
        self.build_ranges: list[tuple[int, int]] = []

    def __enter__(self) -> SyncLedger:
        self._catcher = warnings.catch_warnings(record=True)
        self.records = self._catcher.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        SyncLedger.active = self
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        SyncLedger.active = None
        self._catcher.__exit__(*exc)

    def syncs(self) -> tuple[int, int, int, int]:
        """(in our hot path, in our one-off engine build, in our reads, elsewhere) host syncs."""
        ours = build = reads = others = 0
        for index, record in enumerate(self.records):
            if "synchronizing" not in str(record.message):
                continue
            if any(begin <= index < end for begin, end in self.read_ranges):
                reads += 1
            elif any(begin <= index < end for begin, end in self.build_ranges):
                build += 1
            elif f"{os.sep}mfu_callbacks{os.sep}" in record.filename:
                ours += 1
            else:
                others += 1
        return ours, build, reads, others


SyncLedger.active = None


def _mark(owner: type, name: str, ranges: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def marked(*args, **kwargs):
        ledger = SyncLedger.active
        begin = len(ledger.records) if ledger else 0
        try:
            return original(*args, **kwargs)
        finally:
            if ledger:
                getattr(ledger, ranges).append((begin, len(ledger.records)))

    setattr(owner, name, marked)


def ledger_marks_reads_and_builds() -> None:
    """Mark the meter's log-time reads (one sync each, by design) and the one-off engine build."""
    _mark(MFUMeter, "metrics", "read_ranges")
    _mark(MFUMeter, "summary", "read_ranges")
    _mark(FlopEngine, "from_model", "build_ranges")


def prove_no_sync_in_a_plain_loop(steps: int = 30) -> str:
    """A loop of pure PyTorch (nothing in it syncs) between two reads, under sync debug mode "error"."""
    if not torch.cuda.is_available():
        return "no CUDA: skipped"
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(1024, 512),
        torch.nn.Linear(512, 2048),
        torch.nn.GELU(),
        torch.nn.Linear(2048, 1024),
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    ids = torch.randint(0, 1024, (8, 256), device=device)
    batch = {"input_ids": ids}

    def forward(module, b):
        logits = module(b["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["input_ids"].flatten())

    meter = MFUMeter(model, warmup_steps=1, peak_tflops=989.4, forward=forward)
    for step in range(steps + 2):
        if step == 2:
            meter.metrics()
            torch.cuda.set_sync_debug_mode("error")
        meter.start_step(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step()
    torch.cuda.set_sync_debug_mode(0)
    mfu = meter.metrics()["mfu"]
    return f"{steps} steps between two reads under set_sync_debug_mode('error'): no host sync (MFU {mfu:.4f})"


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
    """Model FLOPs: without checkpointing, and without the input gradient that checkpointing's
    ``enable_input_require_grads`` forces on the embeddings (no trainable parameter needs it)."""
    was = getattr(model, "is_gradient_checkpointing", False)
    if was:
        model.gradient_checkpointing_disable()
    forced = [  # the hook of transformers' and PEFT's enable_input_require_grads, set aside meanwhile
        (module, key, module._forward_hooks.pop(key))
        for module in model.modules()
        for key, hook in list(module._forward_hooks.items())
        if getattr(hook, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad")
    ]
    try:
        return truth_step_flops(model, batch)
    finally:
        for module, key, hook in forced:
            module._forward_hooks[key] = hook
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


# -- the wall clock of the measured steps, and the Lightning module, for every benchmark of a framework --
def hf_wall_clock(warmup: int, measured: int, clock: dict[str, float]):
    """A Trainer callback that puts the host clock at the first measured step's begin and the last's end
    (after a sync each) into ``clock["begin"]`` and ``clock["end"]``."""
    from transformers import TrainerCallback

    class WallClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync()
                clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + measured:
                sync()
                clock["end"] = time.perf_counter()

    return WallClock()


def lightning_wall_clock(warmup: int, measured: int, clock: dict[str, float]):
    """The same as ``hf_wall_clock`` for Lightning."""
    import lightning as L

    class WallClock(L.Callback):
        def on_train_batch_start(self, trainer, module, b, batch_idx):
            if trainer.global_step == warmup:
                sync()
                clock["begin"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, b, batch_idx):
            if trainer.global_step == warmup + measured:
                sync()
                clock["end"] = time.perf_counter()

    return WallClock()


def lightning_module(model: torch.nn.Module):
    """``model`` trained by Lightning: its loss logged as ``train/loss``, AdamW over its trainable weights."""
    import lightning as L

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

    return Module()


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
        meter.start_step(batch)
        with torch.autocast(
            batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=torch.cuda.is_available()
        ):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step()
    sync()
    wall = time.perf_counter() - begin
    return meter.metrics(), wall


def hf_arguments(rows: int, steps: int, logging_steps: int):
    """The benchmarks' HF ``TrainingArguments``: ``steps`` optimizer steps of ``rows`` rows, bf16 on a
    GPU, no reporting, saving or progress bar, the data in the main process."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="mfu-bench-"),
        max_steps=steps,
        per_device_train_batch_size=rows,
        logging_steps=logging_steps,
        bf16=torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-5,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def run_hf(model, batch, warmup, measured, peak_tflops):
    from transformers import Trainer

    from mfu_callbacks.transformers import MFUCallback

    clock: dict[str, float] = {}
    rows = len(batch["input_ids"])
    args = hf_arguments(rows, warmup + measured, logging_steps=warmup + measured)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=FixedBatches(batch, rows * (warmup + measured)),
        callbacks=[
            MFUCallback(warmup_steps=warmup, peak_tflops=peak_tflops),
            hf_wall_clock(warmup, measured, clock),
        ],
    )
    trainer.train()
    logged = next(row for row in trainer.state.log_history if "loss" in row)
    metrics = {k: v for k, v in logged.items() if k in ("mfu", "hfu", "tflops_per_gpu", "step_time")}
    return metrics, clock["end"] - clock["begin"]


def run_lightning(model, batch, warmup, measured, peak_tflops):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mfu_callbacks.lightning import MFUCallback

    clock: dict[str, float] = {}

    rows = len(batch["input_ids"])
    loader = torch.utils.data.DataLoader(FixedBatches(batch, rows * (warmup + measured)), batch_size=rows)
    logs = tempfile.mkdtemp()
    trainer = L.Trainer(
        max_steps=warmup + measured,
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        log_every_n_steps=warmup + measured,
        logger=CSVLogger(logs, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            MFUCallback(warmup_steps=warmup, peak_tflops=peak_tflops),
            lightning_wall_clock(warmup, measured, clock),
        ],
    )
    trainer.fit(lightning_module(model), loader)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("train/step_time"))
    metrics = {
        k.split("/")[1]: float(v)
        for k, v in row.items()
        if v and k.startswith("train/") and k != "train/loss"
    }
    return metrics, clock["end"] - clock["begin"]


def run_accelerate(model, batch, warmup, measured, peak_tflops):
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-5)
    rows = len(batch["input_ids"])
    loader = torch.utils.data.DataLoader(FixedBatches(batch, rows * (warmup + measured)), batch_size=rows)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = MFUTracker(
        accelerator, model, warmup_steps=warmup, log_interval=warmup + measured, peak_tflops=peak_tflops
    )
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--integrations", default=",".join(RUNNERS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="needed on a CPU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ledger_marks_reads_and_builds()
    peak_info = resolve_peak(
        device, "bf16" if device.type == "cuda" else "fp32", override_tflops=args.peak_tflops
    )
    peak = peak_info.flops
    import accelerate
    import lightning
    import peft
    import transformers

    print(
        f"device: {peak_info.device_name}; peak {peak / 1e12:.1f} TFLOP/s ({peak_info.source}); torch {torch.__version__}, "
        f"transformers {transformers.__version__}, lightning {lightning.__version__}, accelerate {accelerate.__version__}, "
        f"peft {peft.__version__}; model {args.size}, {args.warmup} warm-up + {args.measured} measured steps"
    )
    header = (
        f"{'integration':<12} {'config':<10} {'truth MFU':>9} {'ours':>8} {'ours/truth':>10} {'6N MFU':>8} "
        f"{'measure_flops MFU':>20} {'our syncs':>9} {'build syncs':>11} {'read syncs':>10} "
        f"{'framework syncs/step':>20}"
    )
    print(header)
    results = []
    for config in args.configs.split(","):
        for integration in args.integrations.split(","):
            model = build(args.size, config, device)
            batch = batch_for(args.size, device)
            truth = truth_flops_without_recompute(model, batch)
            six_n = six_n_tokens(model, batch)
            measured_flops = lightning_measure_flops(model, batch)
            with SyncLedger() as ledger:
                metrics, wall = RUNNERS[integration](
                    model, batch, args.warmup, args.measured, args.peak_tflops
                )
            ours_syncs, build_syncs, read_syncs, other_syncs = ledger.syncs()
            truth_mfu = truth * args.measured / wall / peak
            ours = metrics.get("mfu")
            lightning_mfu = (
                f"{measured_flops * args.measured / wall / peak:.4f}"
                if isinstance(measured_flops, int)
                else measured_flops[:20]
            )
            row = (
                f"{integration:<12} {config:<10} {truth_mfu:>9.4f} {ours if ours is None else f'{ours:.4f}':>8} "
                f"{'' if ours is None else f'{ours / truth_mfu:.4f}':>10} {six_n * args.measured / wall / peak:>8.4f} "
                f"{lightning_mfu:>20} {ours_syncs:>9} {build_syncs:>11} {read_syncs:>10} "
                f"{other_syncs / (args.warmup + args.measured):>20.1f}"
            )
            print(row, flush=True)
            results.append(row)
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print("plain PyTorch loop:", prove_no_sync_in_a_plain_loop())


if __name__ == "__main__":
    main()
