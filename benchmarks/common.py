"""Shared pieces of the GPU benchmarks: model configs, synthetic batches, the independent FLOP count."""

from __future__ import annotations

import statistics

import torch

from mfu_callbacks.testing import causal_lm, reference_step_flops

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, batch)
    "1b": (2048, 16, 16, 8, 5632, 32000, 2048, 4),
    "small": (512, 4, 8, 8, 1408, 8192, 512, 8),
    "mid": (1024, 8, 16, 8, 2816, 32000, 1024, 8),
    "tiny": (64, 2, 4, 2, 128, 256, 32, 2),
}


def median_p90(samples: list[float]) -> tuple[float, float]:
    """The median and the 90th percentile (the sample below which nine tenths fall) of ``samples``."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def sync() -> None:
    """Wait for the GPU (a wall clock around GPU work needs one at each end); nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llama(size: str, *, moe: bool = False, attention: str = "sdpa") -> torch.nn.Module:
    """A Llama of one of the sizes above, or with ``moe`` a Mixtral (8 experts of half the MLP width, top 2)."""
    hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, _ = SIZES[size]
    return causal_lm(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        max_positions=seq_len,
        intermediate=intermediate // 2 if moe else intermediate,
        experts=8 if moe else 0,
        attention=attention,
    )


def batch_for(size: str, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    _, _, _, _, _, vocab, seq_len, batch = SIZES[size]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
    }


def truth_step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one training step by torch's FlopCounterMode on an eager-attention, eager-experts copy (bf16 on a GPU)."""
    autocast_dtype = torch.bfloat16 if batch["input_ids"].is_cuda else None
    return reference_step_flops(model, batch, eager_copy=True, autocast_dtype=autocast_dtype)


def six_n_tokens(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Hugging Face Trainer's ``floating_point_ops``: 6 x tokens x parameters without embeddings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return 6 * batch["input_ids"].numel() * base.num_parameters(exclude_embeddings=True)
