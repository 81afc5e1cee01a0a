"""Sliding-window and chunked attention: counted by the window, against a twin model whose attention
computes only the window.

FlopCounterMode on eager attention counts length**2 for every layer, window or not, so it cannot
referee model FLOPs here. The reference is a twin: the same model (a deep copy, same weights) with
an attention function registered in transformers that multiplies each query by the keys of its
window only, min(length, window) of them for a sliding window and those of its chunk for chunked
attention (every key for a layer without a window). FlopCounterMode on the twin then counts what a
layer with that window needs by the convention (length * min(length, window) per sequence, no
causal discount), worked out by torch's own counter from the shapes that ran rather than by the
engine's arithmetic. Hardware FLOPs follow the kernel: eager and sdpa compute every square under a
mask (the truth is the eager model as it is), flash attention computes only a sliding window.

Windows of 4 and 8 tokens, sequences of 6 and 16: below and above each window.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

import mfu_callbacks.flops.model_config as model_config
from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.flops.counting.attention_windows import AttentionWindow
from mfu_callbacks.flops.counting.tokens import TokenCounting
from mfu_callbacks.flops.features import WINDOW_FEATURES, features_of_full_rows
from tests.conftest import (
    SMALL_DECODER,
    assert_flops,
    full_batch,
    make_eager,
    model_truth,
    packed_batch,
    padded_batch,
    step_truth,
)

TWIN = "window_only_reference"


# name: (config class, model class, config arguments)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SMALL_DECODER, "sliding_window": 4}),
    "qwen2": (  # the last two of four layers slide
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {**SMALL_DECODER, "use_sliding_window": True, "max_window_layers": 2, "sliding_window": 8},
    ),
    "gemma2": (  # local and global layers alternate
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**SMALL_DECODER, "head_dim": 8, "sliding_window": 8},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **SMALL_DECODER,
            "head_dim": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        },
    ),
    "llama4": (  # chunks of 4 in the layers with rotary embeddings, the last layer global; dense MLPs
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            **SMALL_DECODER,
            "head_dim": 8,
            "intermediate_size_mlp": 64,
            "moe_layers": [],
            "attention_chunk_size": 4,
        },
    ),
}


def _keys_of_queries(length: int, window: int | None, chunked: bool) -> list[tuple[int, int, int, int]]:
    """(query start, query stop, key start, key stop) blocks: each query meets only the keys of its window."""
    if window is None:
        return [(0, length, 0, length)]
    if chunked:
        return [(start, min(start + window, length)) * 2 for start in range(0, length, window)]
    keys = min(length, window)
    return [
        (query, query + 1, max(0, query - keys + 1), max(0, query - keys + 1) + keys)
        for query in range(length)
    ]


def _window_of_layer(module: nn.Module, kwargs: dict[str, Any]) -> tuple[int | None, bool]:
    """What the model passes its attention function (Mistral, Qwen2, Gemma: ``sliding_window``), or
    for Llama-4 its config's chunk size on chunked layers."""
    if kwargs.get("sliding_window"):
        return int(kwargs["sliding_window"]), False
    config = module.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[module.layer_idx] == "chunked_attention":
        return int(config.attention_chunk_size), True
    return None, False


def window_only_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over each query's window only (the mask is ignored: the reference runs unpadded)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    window, chunked = _window_of_layer(module, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    outputs = []
    for start, stop, key_start, key_stop in _keys_of_queries(query.shape[2], window, chunked):
        scores = query[:, :, start:stop] @ key[:, :, key_start:key_stop].transpose(-1, -2) * scale
        outputs.append(scores.softmax(-1) @ value[:, :, key_start:key_stop])
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(TWIN, window_only_attention)
AttentionMaskInterface.register(TWIN, eager_mask)


def build(name: str) -> nn.Module:
    config_class, model_class, arguments = FAMILIES[name]
    config = getattr(transformers, config_class)(**arguments)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).train()


def twin(model: nn.Module) -> nn.Module:
    """The same model, computing each layer's window only."""
    copied = make_eager(copy.deepcopy(model))
    for module in copied.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            config._attn_implementation = TWIN
    return copied


def batches() -> list[dict[str, torch.Tensor]]:
    return [
        full_batch(2, 6),
        full_batch(2, 16),
        padded_batch([16, 6, 11]),
        packed_batch([6, 16, 3]),
    ]


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize(
    "name",
    # Mistral in the unit tier; Qwen2, Gemma-2 and Gemma-3 (local and global layers) in the slow tier.
    [name if name == "mistral" else pytest.param(name, marks=pytest.mark.slow) for name in FAMILIES],
)
def test_windowed_layers_count_their_window(name: str) -> None:
    model = build(name)
    engine = FlopEngine.from_model(model, full_batch(3, 7))
    reference, eager = twin(model), make_eager(model)
    for batch in batches():
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(reference, batch), f"{name} model FLOPs")
        # sdpa with a mask computes every square: the eager model as it runs
        assert_flops(step.hardware_flops, step_truth(eager, batch), f"{name} hardware FLOPs")


def test_full_attention_families_are_unchanged() -> None:
    """A window longer than every sequence leaves the count of full attention as it was."""
    model = build("mistral")
    model.config.sliding_window = 64
    engine = FlopEngine.from_model(model, full_batch(3, 7))
    eager = make_eager(model)
    for batch in batches():
        assert_flops(engine.estimate(batch).model_flops, model_truth(eager, batch), "model FLOPs")


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("name", ["mistral", "llama4"])
def test_flash_attention_computes_a_sliding_window_but_not_chunks(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under flash attention (no flash kernel on CPU: the engine is told so) a sliding window is what
    the kernel computes, and documents of packed rows attend alone; chunks are computed in full."""
    model = build(name)
    monkeypatch.setattr(model_config, "attention_implementation", lambda _: "flash_attention_2")
    engine = FlopEngine.from_model(model, full_batch(3, 7))
    kernel = twin(model) if name == "mistral" else make_eager(copy.deepcopy(model))
    for batch in (full_batch(2, 16), padded_batch([16, 6, 11])):
        assert_flops(
            engine.estimate(batch).hardware_flops, step_truth(kernel, batch), f"{name} hardware FLOPs"
        )
    packed = packed_batch([6, 16, 3])
    per_document = model_truth(kernel, packed)
    assert_flops(engine.estimate(packed).hardware_flops, per_document, f"{name} packed hardware FLOPs")


class TwoWindows(nn.Module):
    """Two language models with different windows under one loss: two window features at once."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow, self.wide = build("mistral"), build("mistral")
        self.wide.config.sliding_window = 8

    def forward(self, **batch: torch.Tensor) -> Any:
        first, second = self.narrow(**batch), self.wide(**batch)
        first.loss = first.loss + second.loss
        return first


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_layers_of_different_windows_are_counted_each_by_its_own() -> None:
    model = TwoWindows().train()
    engine = FlopEngine.from_model(model, full_batch(3, 7))
    assert [window.size for window in engine.counting.windows] == [4, 8]
    reference = twin(model)
    for batch in (full_batch(2, 6), full_batch(2, 16), padded_batch([16, 6, 11])):
        assert_flops(engine.estimate(batch).model_flops, model_truth(reference, batch), "model FLOPs")


@pytest.mark.parametrize("name", ["gemma2", "llama4"])
def test_features_of_full_rows_count_the_windows(name: str) -> None:
    model = build(name)
    engine = FlopEngine.from_model(model, full_batch(3, 7))
    counting = engine.counting
    for length in (6, 16):
        batch = full_batch(3, length)
        features = features_of_full_rows(3, length, None, counting.windows, counting.kernel_windows)
        assert features == engine.count(batch).tolist()


def _pairs(lengths: list[int], window: AttentionWindow | None) -> int:
    """(query, key) products of documents of these lengths when each query meets only its window's keys."""
    return sum(
        (stop - start) * (key_stop - key_start)
        for length in lengths
        for start, stop, key_start, key_stop in _keys_of_queries(
            length, window.size if window else None, bool(window and window.chunked)
        )
    )


@pytest.mark.parametrize("attention_per_document", [False, True], ids=["masked-kernel", "flash-kernel"])
def test_packed_documents_count_their_windows_alone(attention_per_document: bool) -> None:
    """Restarting positions and cu_seq_lens (Hugging Face's flattening collator) give each document its
    own windows; the hardware row counts what the kernel computes: per document when it attends per
    document, else over the whole row, and every square where it computes no window (chunks)."""
    windows = (AttentionWindow(4), AttentionWindow(8), AttentionWindow(4, chunked=True))
    kernel_windows = (AttentionWindow(4), AttentionWindow(8), None)
    counting = TokenCounting(
        encoder_decoder=False,
        attention_per_document=attention_per_document,
        windows=windows,
        kernel_windows=kernel_windows,
    )
    lengths = [6, 16, 3]
    packed = packed_batch(lengths)
    flattened = {"input_ids": packed["input_ids"], "cu_seq_lens_q": torch.tensor([0, 6, 22, 25])}
    computed_over = lengths if attention_per_document else [sum(lengths)]
    for batch in (packed, flattened):
        features = counting.count(batch)[:, list(WINDOW_FEATURES)].tolist()
        assert features[0] == [_pairs(lengths, window) for window in windows]
        assert features[1] == [_pairs(computed_over, kernel) for kernel in kernel_windows]


@pytest.mark.parametrize("name", ["mistral", "gemma2", "llama4"])
def test_a_real_step_counts_each_layer_by_its_window(name: str) -> None:
    """The real-step counter attributes attention inside a windowed layer to that window's squares."""
    from tests.flops.test_observe import observed_engine

    model = make_eager(build(name))
    engine = observed_engine(model, full_batch(2, 16))
    reference = twin(model)
    for batch in (full_batch(2, 16), full_batch(1, 24), padded_batch([16, 6, 11])):
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(reference, batch), f"{name} model FLOPs")
        assert_flops(step.hardware_flops, step_truth(model, batch), f"{name} hardware FLOPs")
