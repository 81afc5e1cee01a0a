"""What a model's Hugging Face config says that counting needs (the attention kernel, encoder-decoder or
not, the pad id), the ``TokenCounting`` that follows from it, and how to make a copy use eager kernels.
A model without a config reads as eager."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from torch import nn

from .counting.attention_windows import kernel_window, model_windows
from .counting.tokens import TokenCounter, TokenCounting
from .features import WINDOW_FEATURES
from .unwrap import unwrap_model


def configs(model: nn.Module) -> Iterator[Any]:
    """Every config of the model's modules, and the text, vision, encoder and decoder configs inside them."""
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        stack = [config]
        while stack:
            config = stack.pop()
            if config is None or id(config) in seen or not hasattr(config, "to_dict"):
                continue
            seen.add(id(config))
            yield config
            stack.extend(
                getattr(config, key, None) for key in ("text_config", "vision_config", "encoder", "decoder")
            )


def attention_implementation(model: nn.Module) -> str:
    """The attention kernel the first config names ("sdpa", "flash_attention_2", ...)."""
    for config in configs(model):
        implementation = getattr(config, "_attn_implementation", None)
        if implementation:
            return str(implementation)
    return "eager"


def is_encoder_decoder(model: nn.Module) -> bool:
    return any(getattr(config, "is_encoder_decoder", False) for config in configs(model))


def pad_token_id(model: nn.Module) -> int | None:
    """The pad id the model's config names (TRL's SFTTrainer copies the tokenizer's onto it)."""
    for config in configs(model):
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return None


def use_eager_kernels(replica: nn.Module) -> None:
    """Eager attention and experts on the replica: every matmul is then visible to the trace."""
    for config in configs(replica):
        for attribute in ("_attn_implementation", "_experts_implementation"):
            with suppress(AttributeError, ValueError, TypeError):
                setattr(config, attribute, "eager")


def token_counting(model: nn.Module, token_counter: TokenCounter | None = None) -> TokenCounting:
    """How batches of ``model`` are reduced to features (what its attention kernel computes decides
    whether packed rows count attention per document in hardware FLOPs)."""
    base = unwrap_model(model)
    implementation = attention_implementation(base)
    windows = model_windows(base, len(WINDOW_FEATURES))
    return TokenCounting(
        encoder_decoder=is_encoder_decoder(base),
        attention_per_document="flash" in implementation,
        token_counter=token_counter,
        pad_token_id=pad_token_id(base),
        windows=windows,
        kernel_windows=tuple(kernel_window(window, implementation) for window in windows),
    )
