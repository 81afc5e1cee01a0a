"""Shared pieces of the examples: a Llama-style model built from a config, and synthetic token data.

Nothing is downloaded: the model is initialised from a config, the data are random token ids of
mixed lengths (so padding, and what it costs, shows up in the metrics).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset

from mfu_callbacks.testing import causal_lm


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hidden-size", type=int, default=128, help="model width (2048 for a ~1B model on a GPU)"
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (key/value heads: a quarter)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128, help="longest sequence; others are shorter")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (r=16) through PEFT")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (on a GPU)")
    parser.add_argument("--wandb", action="store_true", help="report to Weights & Biases")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense peak TFLOP/s per device; needed on a CPU, which has no datasheet peak",
    )


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A Llama-style causal LM from a config (key/value heads a quarter of the heads), optionally with LoRA adapters."""
    return causal_lm(
        hidden=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=max(args.heads // 4, 1),
        intermediate=args.hidden_size * 8 // 3 // 64 * 64 or 64,
        vocab=args.vocab_size,
        max_positions=args.seq_len,
        lora_rank=16 if args.lora else None,
    )


class RandomTokens(Dataset):
    """Sequences of random token ids, lengths between half the maximum and the maximum."""

    def __init__(self, size: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (size,), generator=generator)
        self.rows = [torch.randint(0, vocab_size, (int(n),), generator=generator) for n in lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index]}


def pad_batch(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; labels ignore the padding."""
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = row["input_ids"]
        attention_mask[i, : len(row["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
