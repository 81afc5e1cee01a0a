"""The few numbers a batch is reduced to, from which the FLOPs of a step follow exactly.

Every matmul of a transformer-like model scales with one of these: tokens (projections, MLPs,
heads), squared sequence lengths (self-attention scores and values; for a layer with a window of
keys, the squares that window leaves, see ``attention_windows.py``), the product of encoder and decoder
lengths (cross-attention), rows (per-sequence heads such as a pooler), labelled positions (a head
that scores only the positions with a label: TRL's fused head on CUDA) or nothing at all (per-call
work such as DoRA's weight norm). A batch is counted once into a small int64 tensor on
its own device, without reading it back to the host, and the FLOPs are a dot product with
coefficients the engine fits once per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from .counting.attention_windows import AttentionWindow


class Feature(IntEnum):
    """Columns of a feature vector."""

    ROWS = 0  # sequences (or images) in the batch
    TOKENS = 1  # tokens of the main stream (decoder-only text, encoder text, ...)
    SQUARES = 2  # sum over attention segments of length**2 in the main stream
    DECODER_TOKENS = 3  # tokens of the decoder stream of an encoder-decoder
    DECODER_SQUARES = 4  # sum of decoder length**2
    CROSS = 5  # sum over rows of encoder length * decoder length
    CALLS = 6  # forward calls (micro-batches): per-call work such as DoRA's weight norm
    # Main-stream squares of the engine's attention windows (``TokenCounting.windows``, in order),
    # for the layers that have that window: a few distinct windows per model at most. WINDOW_* here
    # always means an attention window (``attention_windows.AttentionWindow``).
    WINDOW_SQUARES_1 = 7
    WINDOW_SQUARES_2 = 8
    WINDOW_SQUARES_3 = 9
    # Positions whose next token has a label (``labels[:, 1:] != -100``, ``shift_labels``, or a TRL
    # ``completion_mask``/``assistant_masks`` shifted alike): what a head that scores only those multiplies.
    LABELLED = 10


NUM_FEATURES = len(Feature)
CALLS_INDEX = int(Feature.CALLS)
WINDOW_FEATURES = (Feature.WINDOW_SQUARES_1, Feature.WINDOW_SQUARES_2, Feature.WINDOW_SQUARES_3)

# A counted batch is a (2, NUM_FEATURES) int64 tensor: row MODEL holds real tokens only (what
# MFU counts), row HARDWARE holds what was computed, padding included (what HFU counts).
MODEL = 0
HARDWARE = 1


def stream_features(rows: int, length: int, decoder_length: int | None = None) -> list[int]:
    """Rows, tokens and squared lengths of ``rows`` unpadded rows of ``length`` tokens, their decoder
    stream and cross-attention (``decoder_length`` tokens a row), one forward call: the features that
    follow from the sizes alone (no labels, no windows). The engine's probes are described by them."""
    features = [0] * NUM_FEATURES
    features[Feature.ROWS] = rows
    features[Feature.TOKENS] = rows * length
    features[Feature.SQUARES] = rows * length * length
    if decoder_length is not None:
        features[Feature.DECODER_TOKENS] = rows * decoder_length
        features[Feature.DECODER_SQUARES] = rows * decoder_length * decoder_length
        features[Feature.CROSS] = rows * length * decoder_length
    features[Feature.CALLS] = 1  # one forward call
    return features


def features_of_full_rows(
    rows: int,
    length: int,
    decoder_length: int | None = None,
    windows: Sequence[AttentionWindow] = (),
    kernel_windows: Sequence[AttentionWindow | None] = (),
) -> list[list[int]]:
    """The features of ``rows`` unpadded rows of ``length`` tokens, without building the batch.

    What ``FlopEngine.count`` gives for a batch with no attention mask: each row is one sequence,
    so tokens are rows * length and squared lengths rows * length**2; an encoder-decoder adds its
    decoder stream (``decoder_length`` tokens a row) and cross-attention (encoder length times
    decoder length, per row); a decoder-only model's rows are labelled at every position but the last.
    Nothing is padding, so the model row and the hardware row agree, but
    for attention windows (``TokenCounting.windows`` and ``kernel_windows``): the hardware row counts
    what the kernel computes, full squares unless it computes only the window.
    Python integers, exact at any size (int64 overflows once rows * length**2 passes 9.2e18).
    """
    features = stream_features(rows, length, decoder_length)
    if decoder_length is None:  # a causal LM's labels are its inputs: every position but a row's last has one
        features[Feature.LABELLED] = rows * (length - 1)
    hardware = list(features)
    for feature, window, computed in zip(WINDOW_FEATURES, windows, kernel_windows):
        features[feature] = rows * window.squares(length)
        hardware[feature] = rows * computed.squares(length) if computed else features[Feature.SQUARES]
    return [features, hardware]  # MODEL, HARDWARE
