"""Attention limited to a window of keys: which layers have one, and the squared lengths it leaves.

Sliding-window attention (Mistral, Qwen2 with ``use_sliding_window``, the local layers of Gemma-2/3)
lets each query see the last ``size`` keys; chunked attention (Llama-4) cuts a sequence into chunks
of ``size`` tokens that attend only within themselves. Full attention counts length**2 per sequence
(no causal discount, the convention of PaLM appendix B and torchtitan); by the same convention a
windowed layer counts length * min(length, size), and a chunked one the sum of its chunks' squares.

Hugging Face configs name each layer's kind in ``layer_types``; Mistral-style configs have none and
window every layer when ``sliding_window`` is set. Only causal attention is read: bidirectional
windows (ModernBERT) reach both ways and count as full attention here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

# layer type in a config's ``layer_types`` -> (config attribute holding the window's size, chunked)
_LAYER_TYPES = {
    "sliding_attention": ("sliding_window", False),
    "chunked_attention": ("attention_chunk_size", True),
}

Lengths = TypeVar("Lengths", int, torch.Tensor)


@dataclass(frozen=True, order=True)
class AttentionWindow:
    """The keys a query sees: the last ``size`` (sliding) or those of its chunk of ``size`` tokens (chunked)."""

    size: int
    chunked: bool = False

    def squares(self, lengths: Lengths) -> Lengths:
        """Squared-length units of sequences of these lengths (an int, or elementwise on an int64 tensor).

        Sliding: l * min(l, size). Chunked: l // size full chunks of size**2, and the rest squared.
        """
        if self.chunked:
            return (lengths // self.size) * self.size * self.size + (lengths % self.size) ** 2
        if isinstance(lengths, torch.Tensor):
            return lengths * lengths.clamp(max=self.size)
        return lengths * min(lengths, self.size)

    def position_squares(self, positions: torch.Tensor) -> torch.Tensor:
        """Each token's share of its document's squared-length units, elementwise.

        A token at position p adds squares(p + 1) - squares(p): over a document of length l that
        telescopes to squares(l), with no need to find where documents end (which would read the device).
        """
        return self.squares(positions + 1) - self.squares(positions)

    def __str__(self) -> str:
        return f"chunks of {self.size}" if self.chunked else f"sliding window {self.size}"


def attention_window_of(module: nn.Module) -> AttentionWindow | None:
    """The window of a causal attention module that holds its config and layer index; None for full attention."""
    config = getattr(module, "config", None)
    layer = getattr(module, "layer_idx", None)
    if (
        config is None
        or not isinstance(layer, int)
        or "attention" not in type(module).__name__.lower()
        or getattr(module, "is_causal", True) is False
    ):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral-style: one window for every layer, or none
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else None
    else:
        kind = layer_types[layer] if 0 <= layer < len(layer_types) else None
    size_attribute, chunked = _LAYER_TYPES.get(kind or "", ("", False))
    size = getattr(config, size_attribute, None) if size_attribute else None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return None
    return AttentionWindow(size, chunked)


def model_windows(model: nn.Module, slots: int) -> tuple[AttentionWindow, ...]:
    """The distinct windows of the model's attention layers, at most ``slots`` of them (those of the most
    layers first); layers with a window beyond those count as full attention."""
    layers = Counter(
        window for module in model.modules() if (window := attention_window_of(module)) is not None
    )
    return tuple(sorted(window for window, _ in layers.most_common(slots)))


def kernel_window(window: AttentionWindow, attention_implementation: str) -> AttentionWindow | None:
    """What the attention kernel computes for a windowed layer: only the window (flash attention, given
    a sliding window), or every square under a mask (None: eager, sdpa, and chunks, which flash
    attention has no argument for)."""
    return window if "flash" in attention_implementation and not window.chunked else None
