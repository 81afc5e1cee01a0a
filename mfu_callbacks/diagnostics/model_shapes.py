"""What the static checks need from the model's structure, read once: vocabulary sizes, linear layers
and the dtypes of trainable and frozen weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..flops.unwrap import unwrap_model

_HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    is_head: bool


@dataclass(frozen=True)
class ModelShapes:
    """What the static checks need from the model, read once."""

    vocab_sizes: tuple[int, ...]  # input embedding rows and LM-head out-features
    linears: tuple[Linear, ...]
    fp32_trainable_parameters: int
    half_frozen_parameters: int  # frozen weights stored in bf16/fp16
    frozen_parameters: int


def _call(model: nn.Module, method: str) -> Any:
    function = getattr(model, method, None)
    if not callable(function):
        return None
    try:
        return function()
    except Exception:  # noqa: BLE001 - models that declare the method without supporting it
        return None


def _rows(module: Any) -> int | None:
    """Rows of an embedding or out-features of a linear layer, whatever wraps it."""
    for attribute in ("num_embeddings", "out_features"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def read_shapes(model: nn.Module) -> ModelShapes:
    """Vocabulary sizes, linear layers and trainable-weight dtypes of the model (read once)."""
    base = unwrap_model(model)
    embeddings, head = _call(base, "get_input_embeddings"), _call(base, "get_output_embeddings")
    if embeddings is None:
        tables = [module for module in base.modules() if isinstance(module, nn.Embedding)]
        embeddings = max(tables, key=lambda table: table.num_embeddings, default=None)
    if head is None:
        head = next(
            (module for name, module in base.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"), None
        )
    vocab_sizes = tuple(dict.fromkeys(size for size in (_rows(embeddings), _rows(head)) if size))
    head_modules = {id(module) for module in head.modules()} if isinstance(head, nn.Module) else set()
    linears = []
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif (
            type(module).__name__ == "Conv1D"
            and getattr(module, "weight", None) is not None
            and module.weight.dim() == 2
        ):
            in_features, out_features = module.weight.shape  # transformers' GPT-2 Conv1D stores (in, out)
        else:
            continue
        linears.append(Linear(name, int(in_features), int(out_features), id(module) in head_modules))
    fp32_trainable = half_frozen = frozen = 0
    for parameter in base.parameters():
        if not parameter.is_floating_point():
            continue
        if parameter.requires_grad:
            fp32_trainable += parameter.numel() if parameter.dtype == torch.float32 else 0
        else:
            frozen += parameter.numel()
            half_frozen += parameter.numel() if parameter.dtype in _HALF_DTYPES else 0
    return ModelShapes(vocab_sizes, tuple(linears), fp32_trainable, half_frozen, frozen)
