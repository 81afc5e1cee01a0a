"""The worked example of `mfu-callbacks compare`: does padding the vocabulary to a multiple of 64 pay?

Three HF Trainer runs of one Llama-style model with the MFU callback at its defaults (bf16): the
vocabulary padded to 32064 (the baseline), the same again (a rerun: the noise), and the vocabulary
left at 32001. Each run writes its `mfu_summary.json`; `compare` then shows the difference with its
interval, and the CI gate is asked about the rerun (should pass) and the unpadded run (should fail).

    python benchmarks/bench_compare_vocab.py --steps 300 --out /tmp/vocab   # on a GPU
    python benchmarks/bench_compare_vocab.py --steps 6 --hidden 64 --layers 2 --seq-len 32 --cpu  # smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mfu_callbacks.testing import causal_lm

UNPADDED_VOCAB = 32001


class RandomRows(Dataset):
    """Rows of random token ids, all of one length (no padding: the vocabulary is what differs)."""

    def __init__(self, rows: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ids[index]
        return {"input_ids": row, "labels": row.clone()}


def train(out: Path, *, pad_vocab: bool, args: argparse.Namespace) -> float:
    from transformers import Trainer, TrainingArguments

    from mfu_callbacks.transformers import MFUCallback

    model = causal_lm(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.hidden // 128 or 2,
        kv_heads=None,
        intermediate=args.hidden * 8 // 3 // 64 * 64,
        vocab=UNPADDED_VOCAB,
        max_positions=args.seq_len,
    )
    if pad_vocab:
        model.resize_token_embeddings(UNPADDED_VOCAB, pad_to_multiple_of=64)
    training = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        logging_steps=10,
        learning_rate=1e-4,
        bf16=not args.cpu,
        use_cpu=args.cpu,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=2 if not args.cpu else 0,
        seed=0,
    )
    data = RandomRows(args.steps * args.batch_size, args.seq_len, UNPADDED_VOCAB)
    callback = MFUCallback(peak_tflops=1.0) if args.cpu else MFUCallback()
    start = time.perf_counter()
    Trainer(model=model, args=training, train_dataset=data, callbacks=[callback]).train()
    print(
        f"{out.name}: vocabulary {model.get_output_embeddings().out_features}, "
        f"{time.perf_counter() - start:.1f} s, summary {callback.summary}",
        flush=True,
    )
    return time.perf_counter() - start


def compare(*runs: Path, gate: bool = False) -> int:
    command = [sys.executable, "-m", "mfu_callbacks.cli", "compare", *map(str, runs)]
    if gate:
        command += ["--max-drop", "2"]
    print("$ mfu-callbacks compare " + " ".join(command[4:]), flush=True)
    return subprocess.run(command).returncode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("vocab-runs"))
    parser.add_argument("--cpu", action="store_true", help="a smoke test on the CPU (peak 1 TFLOP/s)")
    args = parser.parse_args()
    padded, rerun, unpadded = (
        args.out / "vocab-32064",
        args.out / "vocab-32064-rerun",
        args.out / "vocab-32001",
    )
    for out, pad in ((padded, True), (unpadded, False), (rerun, True)):
        train(out, pad_vocab=pad, args=args)
    compare(padded, rerun, unpadded)
    print("gate, rerun against the baseline: exit", compare(padded, rerun, gate=True), flush=True)
    print(
        "gate, unpadded against the padded baseline: exit", compare(padded, unpadded, gate=True), flush=True
    )


if __name__ == "__main__":
    main()
