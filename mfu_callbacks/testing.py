"""Tiny models built from configs, and torch's FlopCounterMode as the independent reference, for
tests, examples and benchmarks.

    model = causal_lm(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, lora_rank=4)
    flops = reference_step_flops(model, batch, eager_copy=True)   # forward + backward, as torch counts it

Nothing is downloaded: models are initialised from a config. Transformers (and PEFT, for LoRA) are
imported when a model is built, so this module, like the rest of the package, needs torch alone.

The reference is ``torch.utils.flop_counter.FlopCounterMode`` around one forward and backward. It
counts exactly what ran, padding and recompute included, but only for the kernels it sees: eager
attention (it misses SDPA on CPU and fails on SDPA with grouped-query attention on CUDA) and eager
MoE experts (it misses transformers' grouped-mm experts kernel). ``make_eager`` switches a model
to those; ``eager_copy=True`` counts on an eager copy and leaves the caller's model as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["causal_lm", "configs_of", "make_eager", "reference_step_flops"]


def causal_lm(
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 64,
    max_positions: int = 64,
    attention: str = "sdpa",
    experts: int = 0,
    experts_per_token: int = 2,
    lora_rank: int | None = None,
    lora_targets: str | Sequence[str] = "all-linear",
    seed: int = 0,
) -> nn.Module:
    """A Llama-style causal LM from a config, weights drawn after ``torch.manual_seed(seed)``.

    kv_heads: key/value heads (grouped-query attention); default: as many as ``heads``.
    intermediate: MLP width (of each expert under MoE); default: twice ``hidden``.
    attention: transformers' attention implementation ("sdpa", "eager", ...).
    experts: routed experts per layer; above 0 the model is a Mixtral (``experts_per_token`` of them
        per token) instead of a Llama.
    lora_rank: wrap the model in PEFT LoRA adapters of this rank (alpha twice the rank) on ``lora_targets``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    sizes: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 2 * hidden,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
    )
    config: MixtralConfig | LlamaConfig
    if experts:
        config = MixtralConfig(num_local_experts=experts, num_experts_per_tok=experts_per_token, **sizes)
    else:
        config = LlamaConfig(**sizes)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model: nn.Module = (
        MixtralForCausalLM(config) if isinstance(config, MixtralConfig) else LlamaForCausalLM(config)
    )
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets if isinstance(lora_targets, str) else list(lora_targets)
        model = get_peft_model(
            model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets)
        )
    return model


def configs_of(model: nn.Module) -> Iterator[Any]:
    """Every transformers config in the model, sub-configs (text, vision, encoder, decoder) included, once each."""
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and id(config) not in seen:
            seen.add(id(config))
            yield config
            for key in ("text_config", "vision_config", "encoder", "decoder"):
                sub = getattr(config, key, None)
                if sub is not None and hasattr(sub, "to_dict") and id(sub) not in seen:
                    seen.add(id(sub))
                    yield sub


def make_eager(model: nn.Module) -> nn.Module:
    """Switch the model to eager attention and eager experts, the kernels FlopCounterMode counts exactly."""
    for config in configs_of(model):
        config._attn_implementation = "eager"
        config._experts_implementation = "eager"
    return model


def reference_step_flops(
    model: nn.Module,
    batch: Any,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    eager_copy: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """FLOPs of one training step (forward + backward) as torch's FlopCounterMode counts them.

    forward: fn(model, batch) -> output; default ``model(**batch)``. The backward starts from the
        output's ``loss`` (attribute or key), or else from the sum of its logits (the loss itself has no matmul).
    eager_copy: count on a deep copy switched to eager kernels (``make_eager``); otherwise the model
        runs as it is, and its gradients are cleared afterwards.
    autocast_dtype: run the forward under autocast at this dtype, on the batch's device.
    """
    reference = make_eager(copy.deepcopy(model)) if eager_copy else model
    run = forward or (lambda module, inputs: module(**inputs))
    precision = torch.autocast(_device_type(batch), dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with FlopCounterMode(display=False) as counter:
        with precision:
            output = run(reference, batch)
        _loss(output).backward()
    if not eager_copy:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _loss(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is not None:
        return loss
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.float().sum()


def _device_type(batch: Any) -> str:
    """Where the batch lives (autocast is entered per device type): its first tensor's device."""
    values = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (tuple, list))
        else [batch]
    )
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    return tensors[0].device.type if tensors else "cpu"
