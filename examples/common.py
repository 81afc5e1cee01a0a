"""Shared pieces of the examples: a small Llama-style model, and synthetic token data.

Nothing is downloaded: the model is initialised from its sizes, the data are random token ids of
mixed lengths (so padding, and what it costs, shows up in the metrics). The Lightning and
Accelerate examples use ``TinyLM``, written in torch alone, so that they need no transformers; the
Trainer example builds transformers' Llama from a config (``build_hf_model``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    """Key/value heads a quarter of the heads; the MLP 8/3 of the width, a multiple of 64."""
    return {
        "hidden": args.hidden_size,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": max(args.heads // 4, 1),
        "intermediate": args.hidden_size * 8 // 3 // 64 * 64 or 64,
        "vocab": args.vocab_size,
        "max_positions": args.seq_len,
    }


def build_model(args: argparse.Namespace) -> nn.Module:
    """``TinyLM`` (torch alone), with LoRA adapters through PEFT under ``--lora``."""
    torch.manual_seed(0)
    model: nn.Module = TinyLM(**_sizes(args))
    if args.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SystemExit('--lora needs peft: pip install "mfu-callbacks[transformers]"') from None
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    return model


def build_hf_model(args: argparse.Namespace) -> nn.Module:
    """transformers' Llama from a config of the same sizes, with LoRA adapters under ``--lora``."""
    from mfu_callbacks.testing import causal_lm

    return causal_lm(**_sizes(args), lora_rank=16 if args.lora else None)


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class Attention(nn.Module):
    """Grouped-query attention through SDPA (``kv_heads`` key/value heads shared by ``heads`` queries)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length, _ = x.shape
        q = self.q_proj(x).view(rows, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(attended.transpose(1, 2).reshape(rows, length, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: attention, then the MLP, each added to the residual stream."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(hidden)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    """A Llama-style causal language model in plain torch (learned positions instead of rotary ones).

    ``model(input_ids=..., attention_mask=..., labels=...).loss`` as with a transformers model;
    labels of -100 are ignored.
    """

    def __init__(
        self,
        *,
        hidden: int,
        layers: int,
        heads: int,
        kv_heads: int,
        intermediate: int,
        vocab: int,
        max_positions: int,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.embed_positions = nn.Embedding(max_positions, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads, kv_heads, intermediate) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Output:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        # causal, and no query attends to padding: [rows, 1, length, length]
        mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:  # each position predicts the next token
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return Output(loss, logits)


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
