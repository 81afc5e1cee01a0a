"""FLOPs and bytes of autoregressive generation, from prompt and completion lengths alone.

Generation is forward passes only, so it is counted with the engine's forward coefficients (the
same ones that count a training forward) applied to the shape of a generation. A row with ``P`` real
prompt tokens that generated ``n`` tokens (its end-of-sequence token included) runs:

- the **prefill**: one forward over the ``P`` prompt tokens; projections and MLPs per token, attention
  over ``P**2`` (query, key) pairs (no causal discount, as for training: PaLM appendix B and torchtitan), and the head on the
  last position only (transformers' ``generate`` passes ``logits_to_keep=1``);
- ``n - 1`` **decode** forwards of one token each (the last new token is never fed back): each costs
  2 x the matmul parameters (the body and the head) plus attention over the KV cache, ``P + k`` keys
  at the ``k``-th decode step (the cache and the token itself).

So the body sees ``P + n - 1`` tokens, the head ``n`` positions and attention
``P**2 + sum_{k=1}^{n-1} (P + k)`` pairs; a layer with an attention window sees the keys its window
leaves. **Model FLOPs** count real tokens only: a prompt's left padding and a row's steps after its
end-of-sequence token are not needed. **Hardware FLOPs** count the padded shape ``generate`` ran: every
row at the longest prompt, for as many steps as the longest completion. Generators the package
cannot watch (vLLM) give the same lengths, so they are counted the same way.

**Bytes read** (decode is bound by memory bandwidth, not by FLOPs): each forward reads every matmul
weight once (the rows of a batch share it), and each decode step reads every row's KV cache, padding
included. Under MoE every expert's weights are counted as read only as often as tokens are routed to
them (the engine's per-token count), a lower bound at large batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum

import torch

from .components import HEAD
from .counting.attention_windows import AttentionWindow
from .features import HARDWARE, MODEL, WINDOW_FEATURES, Feature


class GenerationFeature(IntEnum):
    """Columns of a generation's feature vector (a (2, NUM_GENERATION_FEATURES) int64 tensor, rows
    ``MODEL`` and ``HARDWARE`` as for training batches)."""

    ROWS = 0  # sequences generated
    PROMPT_TOKENS = 1  # prompt tokens prefilled
    PROMPT_SQUARES = 2  # sum of prompt length**2: the prefill's attention pairs
    GENERATED = 3  # new tokens: the head's positions (one at the prefill's end, one per decode step)
    DECODE_PAIRS = 4  # sum over decode steps of the keys attended: the KV cache read
    CALLS = 5  # forward calls (the prefill and each decode step)
    # Per attention window (``TokenCounting.windows``, in order; WINDOW_* always means an attention
    # window here): the prefill's window squares plus the keys the window leaves at each decode step.
    WINDOW_PAIRS_1 = 6
    WINDOW_PAIRS_2 = 7
    WINDOW_PAIRS_3 = 8


NUM_GENERATION_FEATURES = len(GenerationFeature)
_WINDOW_COLUMNS = (
    GenerationFeature.WINDOW_PAIRS_1,
    GenerationFeature.WINDOW_PAIRS_2,
    GenerationFeature.WINDOW_PAIRS_3,
)


def count_generation(
    prompt_lengths: torch.Tensor,
    completion_lengths: torch.Tensor,
    *,
    padded_prompt: int | None = None,
    padded_completion: int | None = None,
    windows: Sequence[AttentionWindow] = (),
) -> torch.Tensor:
    """The generation's features, on the lengths' device, without reading them back.

    ``prompt_lengths``/``completion_lengths``: real tokens per row (int64 tensors of one element per
    generated sequence; the completion's end-of-sequence token included). ``padded_prompt`` and
    ``padded_completion``: the shape the generator ran (the longest prompt after padding, the decode
    steps of the longest row); None where nothing was padded (vLLM), the hardware row is then the model row.
    """
    prompt = prompt_lengths.to(torch.int64).reshape(-1)
    new = completion_lengths.to(torch.int64).reshape(-1).clamp(min=1)
    model = _row(prompt, new, calls=new.max() if new.numel() else new.sum(), windows=windows)
    if padded_prompt is None and padded_completion is None:
        hardware = model
    else:
        full_prompt = torch.full_like(prompt, padded_prompt) if padded_prompt is not None else prompt
        full_new = torch.full_like(new, max(padded_completion, 1)) if padded_completion is not None else new
        calls = full_new.max() if full_new.numel() else full_new.sum()
        hardware = _row(full_prompt, full_new, calls=calls, windows=windows)
    return torch.stack([model, hardware])


def _row(
    prompt: torch.Tensor, new: torch.Tensor, *, calls: torch.Tensor, windows: Sequence[AttentionWindow]
) -> torch.Tensor:
    decode = new - 1
    columns = [
        torch.full((), prompt.numel(), dtype=torch.int64, device=prompt.device),  # a fill: no copy, no sync
        prompt.sum(),
        (prompt * prompt).sum(),
        new.sum(),
        (decode * prompt + decode * new // 2).sum(),  # sum over k = 1..n-1 of P + k
        calls.to(torch.int64),
    ]
    for window in windows[: len(_WINDOW_COLUMNS)]:
        decoded = _keys_up_to(window, prompt + decode) - _keys_up_to(window, prompt)
        columns.append((window.squares(prompt) + decoded).sum())
    columns += [prompt.sum() * 0] * (NUM_GENERATION_FEATURES - len(columns))
    return torch.stack([column.to(torch.int64).reshape(()) for column in columns])


def _keys_up_to(window: AttentionWindow, length: torch.Tensor) -> torch.Tensor:
    """Keys attended summed over queries at positions 1..``length`` of one sequence, one query at a time
    (a decode step at position L sees min(L, size) keys under a sliding window, its chunk's under chunks)."""
    if window.chunked:
        rest = length % window.size
        return (length // window.size) * (window.size * (window.size + 1) // 2) + rest * (rest + 1) // 2
    seen = length.clamp(max=window.size)
    return seen * (seen + 1) // 2 + (length - seen) * window.size


def generation_flops(
    forward: Mapping[str, Sequence[float]],
    features: Sequence[float],
    *,
    head_per_token: float | None = None,
) -> float:
    """Forward FLOPs of a generation with these features (one row of ``count_generation``).

    ``forward``: the engine's forward coefficients per component, per training feature
    (``FlopEngine.forward_coefficients``). ``head_per_token``: the head's FLOPs per scored position,
    where the engine's per-token head coefficient is not that (a training step that scored only some
    positions, counted on the real step); default: the engine's.
    """
    values = list(features)
    rows, generated = values[GenerationFeature.ROWS], values[GenerationFeature.GENERATED]
    body_tokens = values[GenerationFeature.PROMPT_TOKENS] + generated - rows
    pairs = values[GenerationFeature.PROMPT_SQUARES] + values[GenerationFeature.DECODE_PAIRS]
    total = 0.0
    for name, coefficients in forward.items():
        tokens = generated if name == HEAD else body_tokens
        per_token = coefficients[Feature.TOKENS]
        if name == HEAD and head_per_token is not None:
            per_token = head_per_token
        total += per_token * tokens
        total += coefficients[Feature.SQUARES] * pairs
        total += coefficients[Feature.ROWS] * generated  # per-row work, once per forward of each row
        total += coefficients[Feature.CALLS] * values[GenerationFeature.CALLS]
        for feature, column in zip(WINDOW_FEATURES, _WINDOW_COLUMNS):
            total += coefficients[feature] * values[column]
    return total


def generation_bytes(
    features: Sequence[float], *, weight_bytes_per_forward: float, kv_bytes_per_token: float
) -> float:
    """Bytes a generation reads from memory: every weight once per forward call, and the KV cache of
    every key each decode step attends (pass the ``HARDWARE`` row: padding is read too)."""
    return (
        features[GenerationFeature.CALLS] * weight_bytes_per_forward
        + features[GenerationFeature.DECODE_PAIRS] * kv_bytes_per_token
    )


def weight_bytes_per_forward(
    forward: Mapping[str, Sequence[float]], bytes_per_weight: float, *, head_per_token: float | None = None
) -> float:
    """Bytes of the matmul weights one forward reads: 2 FLOPs per weight and token in the per-token
    coefficients, each weight read once per call (``bytes_per_weight``: the storage dtype's size)."""
    weights = 0.0
    for name, coefficients in forward.items():
        per_token = (
            head_per_token if name == HEAD and head_per_token is not None else coefficients[Feature.TOKENS]
        )
        weights += per_token / 2
    return weights * bytes_per_weight


__all__ = [
    "HARDWARE",
    "MODEL",
    "NUM_GENERATION_FEATURES",
    "GenerationFeature",
    "count_generation",
    "generation_bytes",
    "generation_flops",
    "weight_bytes_per_forward",
]
