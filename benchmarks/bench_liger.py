"""Logged model FLOPs with Liger kernels (``use_liger_kernel=True``) against an independent truth.

Liger replaces the RMSNorms, the SwiGLU MLPs and RoPE with Triton kernels and, in the HF Trainer, the
head with its fused linear cross-entropy, which computes the head's input and weight gradients inside
its forward, chunk by chunk, and only scales them in its backward. TRL's SFTTrainer keeps its own fused
head instead (it turns Liger's off). Each row of the run logs MFU; its model FLOPs (``tflops_per_gpu``
x ``step_time`` at one step per row) are set against the truth: the same model without Liger under
torch's FlopCounterMode (eager attention, bf16 autocast), one step of the same batch.

Needs a GPU with liger-kernel installed (Triton). ``--no-liger`` runs the same table without it (a
baseline, and a smoke test on a CPU with ``--size tiny``).

    python benchmarks/bench_liger.py --size 1b --steps 12
    python benchmarks/bench_liger.py --size 1b --trainer trl
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import SIZES, batch_for, llama, truth_step_flops

from mfu_callbacks.transformers import MFUCallback


class SameBatch(torch.utils.data.Dataset):
    """The benchmark batch's rows, over and over: every step has the truth's shape."""

    def __init__(self, batch: dict[str, torch.Tensor], steps: int) -> None:
        self.rows = {key: value.cpu() for key, value in batch.items()}
        self.length = steps * batch["input_ids"].shape[0]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = index % self.rows["input_ids"].shape[0]
        return {key: value[row] for key, value in self.rows.items()}


def train(
    size: str, trainer_kind: str, steps: int, warmup: int, liger: bool, output: str
) -> tuple[list, object]:
    """Rows logged by the trainer (with MFU after warm-up) and the meter's FLOP engine."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch_for(size, device)
    model = llama(size)
    callback = MFUCallback(warmup_steps=warmup, peak_tflops=None if device.type == "cuda" else 1.0)
    common = dict(
        output_dir=output, max_steps=steps, per_device_train_batch_size=batch["input_ids"].shape[0],
        logging_steps=1, report_to=[], save_strategy="no", use_liger_kernel=liger, disable_tqdm=True,
        bf16=device.type == "cuda", use_cpu=device.type != "cuda",
    )  # fmt: skip
    if trainer_kind == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from mfu_callbacks.testing import word_tokenizer

        rows = [{"input_ids": ids.tolist()} for ids in batch["input_ids"].cpu()] * steps
        config = SFTConfig(max_length=batch["input_ids"].shape[1], gradient_checkpointing=False, **common)
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows),
            processing_class=word_tokenizer(SIZES[size][5]), callbacks=[callback],
        )  # fmt: skip
    else:
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=SameBatch(batch, steps), callbacks=[callback]
        )  # fmt: skip
    trainer.train()
    rows = [row for row in trainer.state.log_history if "mfu" in row]
    return rows, callback.session.meter.engine


def head_flops(size: str) -> int:
    """The head's model FLOPs in one step of full fine-tuning: forward, input and weight gradients,
    2 x tokens x hidden x vocabulary each."""
    hidden, _, _, _, _, vocab, seq_len, rows = SIZES[size]
    return 3 * 2 * rows * seq_len * hidden * vocab


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--trainer", choices=("hf", "trl", "both"), default="both")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--no-liger", action="store_true", help="run without Liger (baseline, CPU smoke test)"
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    truth = truth_step_flops(llama(args.size).to(device), batch_for(args.size, device))
    print(
        f"truth (no Liger, FlopCounterMode, one step): {truth:,} FLOPs; head {head_flops(args.size) / truth:.2%} of it"
    )
    print()
    print(
        "| trainer | Liger | rows | logged / truth (min) | (max) | engine's head / the head's model FLOPs | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    kinds = ("hf", "trl") if args.trainer == "both" else (args.trainer,)
    for kind in kinds:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as output:
            rows, engine = train(args.size, kind, args.steps, args.warmup, not args.no_liger, output)
        ratios = [row["tflops_per_gpu"] * 1e12 * row["step_time"] / truth for row in rows]
        head = "n/a"
        if engine is not None:
            breakdown = engine.estimate(batch_for(args.size, device)).breakdown
            head = f"{breakdown.get('head', 0) / head_flops(args.size):.4f} (other: {breakdown.get('other', 0):,})"
        low, high = (f"{min(ratios):.4f}", f"{max(ratios):.4f}") if ratios else ("-", "-")
        seconds = time.perf_counter() - started
        print(f"| {kind} | {not args.no_liger} | {len(ratios)} | {low} | {high} | {head} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
