"""Shared pieces of the GPU benchmarks: model configs, synthetic batches, the independent FLOP count."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, batch)
    "1b": (2048, 16, 16, 8, 5632, 32000, 2048, 4),
    "small": (512, 4, 8, 8, 1408, 8192, 512, 8),
    "mid": (1024, 8, 16, 8, 2816, 32000, 1024, 8),
    "tiny": (64, 2, 4, 2, 128, 256, 32, 2),
}


def llama(size: str, *, moe: bool = False, attention: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, _ = SIZES[size]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  vocab_size=vocab, max_position_embeddings=seq_len)
    torch.manual_seed(0)
    if moe:
        config = MixtralConfig(intermediate_size=intermediate // 2, num_local_experts=8, num_experts_per_tok=2, **common)
        config._attn_implementation = attention
        return MixtralForCausalLM(config)
    config = LlamaConfig(intermediate_size=intermediate, **common)
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


def batch_for(size: str, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    _, _, _, _, _, vocab, seq_len, batch = SIZES[size]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def truth_step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one training step by torch's FlopCounterMode on an eager-attention, eager-experts copy."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
            config._experts_implementation = "eager"
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=batch["input_ids"].is_cuda):
            loss = reference(**batch).loss
        loss.backward()
    del reference
    return counter.get_total_flops()


def six_n_tokens(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Hugging Face Trainer's ``floating_point_ops``: 6 x tokens x parameters without embeddings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return 6 * batch["input_ids"].numel() * base.num_parameters(exclude_embeddings=True)
