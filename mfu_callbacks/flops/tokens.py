"""Reduce a batch to its feature vector (see ``features.py``) without a host sync.

Lengths come from the attention mask; packed rows (restarting ``position_ids``, or ``cu_seq_lens``
from Hugging Face's flattening collator) count attention per document: the sum of l**2 over
documents equals the sum over real tokens of (2 * position + 1), which needs no host round trip.
TRL's padding-free collator with ``pad_to_multiple_of`` ends a flattened row with pad tokens that
each look like a one-token document (position 0); they count as padding (see ``_trailing_pads``).
Layers with a window of keys (``windows.py``) count their window's squares, per document too.
All arithmetic on the batch's tensors stays on their device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .features import CALLS_INDEX, HARDWARE, MODEL, NUM_FEATURES, WINDOW_FEATURES, Feature
from .windows import Window

MAIN_KEYS = ("input_ids", "inputs_embeds")
DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")
IMAGE_KEYS = ("pixel_values", "images", "image")
# Image sizes in patches, (images, 3), whose values the model reads (Qwen2-VL's vision tower and M-RoPE).
GRID_KEYS = ("image_grid_thw",)
PACKED_KEYS = ("cu_seq_lens_q", "cu_seqlens", "cu_seqlens_q")

TokenCounter = Callable[[Any], Mapping[str, torch.Tensor]]


class BatchError(ValueError):
    """A batch in which no tokens or rows can be found."""


@dataclass(frozen=True)
class _Stream:
    rows: int
    length: int
    real_tokens: torch.Tensor | int
    real_squares: torch.Tensor | int
    hardware_squares: torch.Tensor | int
    lengths: torch.Tensor | None  # per-row real lengths, for cross-attention
    real_windowed: tuple[torch.Tensor | int, ...] = ()  # real squares per attention window
    hardware_windowed: tuple[torch.Tensor | int, ...] = ()  # computed squares per attention window


@dataclass(frozen=True)
class _Windows:
    """The attention windows a stream is counted for, and what the kernel computes for each (None: all squares)."""

    model: tuple[Window, ...] = ()
    kernel: tuple[Window | None, ...] = ()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _trailing_pads(
    ids: torch.Tensor, positions: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor | int:
    """Pad tokens at the end of packed rows: the trailing run of tokens at position 0 holding the pad id.

    TRL's ``DataCollatorForLanguageModeling(padding_free=True, pad_to_multiple_of=N)`` flattens the
    documents into one row and right-pads it with the pad id at position 0 (labels -100), so each pad
    token is a one-token document to the attention kernels. A genuine one-token document ends the row
    at position 0 too, so the pad id tells them apart: only a last document made of the pad token
    itself is taken for padding. Without a pad id nothing is.
    """
    if pad_token_id is None or positions is None or ids.is_floating_point() or positions.shape != ids.shape:
        return 0
    pads = (ids == pad_token_id) & (positions == 0)
    return pads.flip(-1).cumprod(-1).sum()  # per row, the run of pads counted back from the end


def _stream(
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    attention_per_document: bool,
    windows: _Windows = _Windows(),
    pad_token_id: int | None = None,
) -> _Stream:
    stream, documents, per_document, pads = _plain_stream(
        ids, mask, positions, cu_seqlens, attention_per_document, pad_token_id
    )
    if not windows.model:
        return stream

    def computed(window: Window) -> torch.Tensor | int:
        """Squares under the window over what the kernel attended: the documents, or the padded rows."""
        return documents(window) if per_document else stream.rows * window.squares(stream.length)

    return replace(
        stream,
        # A pad (a one-token document) has one square under any window.
        real_windowed=tuple(documents(window) - pads for window in windows.model),
        hardware_windowed=tuple(
            stream.hardware_squares if kernel is None else computed(kernel) for kernel in windows.kernel
        ),
    )


def _plain_stream(
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    attention_per_document: bool,
    pad_token_id: int | None = None,
) -> tuple[_Stream, Callable[[Window], torch.Tensor | int], bool, torch.Tensor | int]:
    """The stream; its documents' squares under a window (trailing pads included), as a function of
    the window; whether attention ran per document (so the hardware squares are the documents' too);
    the trailing pads of packed rows."""
    rows, length = ids.shape[0], ids.shape[1]
    if rows <= 0 or length <= 0:
        raise BatchError(
            f"a batch of shape {tuple(ids.shape)} has no tokens to count (rows and sequence length "
            "must be positive): an empty batch has no training step to measure"
        )
    full_squares = rows * length * length

    def full_rows(window: Window) -> int:
        return rows * window.squares(length)

    if cu_seqlens is not None:  # flattened documents: one row, boundaries given
        documents = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        squares = (documents * documents).sum()
        pads = _trailing_pads(ids, positions, pad_token_id)  # one-token documents: a square of 1 each
        hardware = squares if attention_per_document else full_squares
        stream = _Stream(rows, length, documents.sum() - pads, squares - pads, hardware, None)
        return stream, lambda window: window.squares(documents).sum(), attention_per_document, pads
    if mask is not None:
        if mask.dim() != 2:  # a prepared 4-D mask: nothing to read lengths from
            return _Stream(rows, length, rows * length, full_squares, full_squares, None), full_rows, False, 0
        lengths = mask.sum(dim=1, dtype=torch.int64)
        # [sum of l, sum of l**2] in two kernels: each launch is host time on the training step.
        moments = (lengths.unsqueeze(0) ** _exponents(lengths.device)).sum(dim=1)
        stream = _Stream(rows, length, moments[0], moments[1], full_squares, lengths)
        return stream, lambda window: window.squares(lengths).sum(), False, 0
    if positions is not None:  # packed rows: positions restart at 0 for each document
        pads = _trailing_pads(ids, positions, pad_token_id)  # position 0: a square of 1 each
        positions = positions.reshape(-1, positions.shape[-1]).long()
        squares = (2 * positions + 1).sum()
        hardware = squares if attention_per_document else full_squares
        stream = _Stream(rows, length, rows * length - pads, squares - pads, hardware, None)
        return stream, lambda window: window.squares_of_positions(positions), attention_per_document, pads
    return _Stream(rows, length, rows * length, full_squares, full_squares, None), full_rows, False, 0


def _lookup(batch: Mapping[str, Any], keys: Sequence[str]) -> torch.Tensor | None:
    for key in keys:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


class TokenCounting:
    """Counts batches of one layout: which keys hold the streams, and how attention ran."""

    def __init__(
        self,
        *,
        encoder_decoder: bool,
        attention_per_document: bool,
        token_counter: TokenCounter | None = None,
        pad_token_id: int | None = None,
        windows: tuple[Window, ...] = (),
        kernel_windows: tuple[Window | None, ...] | None = None,
    ) -> None:
        """``windows``: the attention windows of the main stream, one feature each (``WINDOW_FEATURES``);
        ``kernel_windows``: what the kernel computes for each (None: every square), default all squares."""
        if len(windows) > len(WINDOW_FEATURES):
            raise ValueError(
                f"at most {len(WINDOW_FEATURES)} attention windows are counted, got {len(windows)}"
            )
        self.encoder_decoder = encoder_decoder
        self.attention_per_document = attention_per_document
        self.token_counter = token_counter
        self.pad_token_id = pad_token_id  # tells padding from a one-token document in packed rows
        self.windows = windows
        self.kernel_windows = kernel_windows if kernel_windows is not None else (None,) * len(windows)
        self._main_windows = _Windows(self.windows, self.kernel_windows)
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def streams(self, batch: Any) -> tuple[_Stream | None, _Stream | None, int, torch.device]:
        """The main stream, the decoder stream, the row count of a batch, and the device it lives on."""
        view = self.token_counter(batch) if self.token_counter is not None else batch
        if isinstance(view, Mapping):
            main_ids = _lookup(view, MAIN_KEYS)
            decoder_ids = _lookup(view, DECODER_KEYS)
            if decoder_ids is None and self.encoder_decoder:
                decoder_ids = _lookup(view, ("labels",))
            main = decoder = None
            if main_ids is not None:
                main = _stream(
                    main_ids,
                    _lookup(view, ("attention_mask",)),
                    _lookup(view, ("position_ids",)),
                    _lookup(view, PACKED_KEYS),
                    self.attention_per_document,
                    self._main_windows,
                    self.pad_token_id,
                )
            if decoder_ids is not None:
                decoder_mask = _lookup(view, ("decoder_attention_mask",))
                if decoder_mask is None and decoder_ids is view.get("labels"):
                    decoder_mask = decoder_ids != -100
                decoder = _stream(decoder_ids, decoder_mask, None, None, self.attention_per_document)
            for stream, ids in ((main, main_ids), (decoder, decoder_ids)):
                if stream is not None and ids is not None:  # a stream exists exactly when its ids do
                    return main, decoder, stream.rows, ids.device
            images = _lookup(view, IMAGE_KEYS)
            if images is not None:
                return None, None, images.shape[0], images.device
            raise BatchError(
                f"cannot count tokens in a batch with keys {sorted(view)}: looked for {', '.join(MAIN_KEYS + IMAGE_KEYS)}. "
                "Pass token_counter=fn, where fn(batch) returns a dict with 'input_ids' (and 'attention_mask' "
                "if the batch is padded)."
            )
        tensor = _first_tensor(view)
        if tensor is None or tensor.dim() == 0:
            raise BatchError(
                f"cannot count tokens in a batch of type {type(view).__name__}: it holds no tensor with a batch "
                "dimension. Pass token_counter=fn, where fn(batch) returns a dict with 'input_ids'."
            )
        if tensor.dim() == 2 and not tensor.is_floating_point():
            return (
                _stream(tensor, None, None, None, self.attention_per_document, self._main_windows),
                None,
                tensor.shape[0],
                tensor.device,
            )
        return None, None, tensor.shape[0], tensor.device

    def count(self, batch: Any) -> torch.Tensor:
        """The batch's (2, NUM_FEATURES) int64 feature tensor, on the batch's device, with no host sync."""
        main, decoder, rows, device = self.streams(batch)  # the features live where the batch does
        constants = [0] * (2 * NUM_FEATURES)  # known on the host
        positions: list[int] = []  # cells whose values live on the device
        values: list[torch.Tensor] = []

        def put(row: int, column: int, value: torch.Tensor | int) -> None:
            if isinstance(value, torch.Tensor):
                positions.append(row * NUM_FEATURES + column)
                values.append(value)
            else:
                constants[row * NUM_FEATURES + column] = int(value)

        for row in (MODEL, HARDWARE):
            put(row, Feature.ROWS, rows)
            put(row, CALLS_INDEX, 1)
        for stream, tokens, squares in (
            (main, Feature.TOKENS, Feature.SQUARES),
            (decoder, Feature.DECODER_TOKENS, Feature.DECODER_SQUARES),
        ):
            if stream is None:
                continue
            put(MODEL, tokens, stream.real_tokens)
            put(MODEL, squares, stream.real_squares)
            put(HARDWARE, tokens, stream.rows * stream.length)
            put(HARDWARE, squares, stream.hardware_squares)
        if main is not None:
            for feature, real, computed in zip(WINDOW_FEATURES, main.real_windowed, main.hardware_windowed):
                put(MODEL, feature, real)
                put(HARDWARE, feature, computed)
        if main is not None and decoder is not None:
            if main.lengths is not None and decoder.lengths is not None:
                cross: torch.Tensor | int = (main.lengths * decoder.lengths).sum()
            elif main.lengths is not None:  # real_tokens is already the sum of the lengths
                cross = main.real_tokens * decoder.length
            elif decoder.lengths is not None:
                cross = decoder.real_tokens * main.length
            else:
                cross = rows * main.length * decoder.length
            put(MODEL, Feature.CROSS, cross)
            put(HARDWARE, Feature.CROSS, rows * main.length * decoder.length)
        base, index = self._layout(device, tuple(constants), tuple(positions))
        if not values:
            return base.clone().view(2, NUM_FEATURES)
        stacked = torch.stack([value.reshape(()).to(torch.int64) for value in values])
        return base.index_add(0, index, stacked).view(2, NUM_FEATURES)

    def _layout(
        self, device: torch.device, constants: tuple[int, ...], positions: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The host-known cells and the device cells' positions, as device tensors, kept per batch shape.

        Built with fills (no host-to-device copy, which would sync); a batch of a shape seen before
        costs no kernel here.
        """
        key = (device, constants, positions)
        layout = self._layouts.get(key)
        if layout is None:
            # fill_ on a slice stays on the device; ``tensor[i] = value`` copies a host scalar and syncs.
            base = torch.zeros(len(constants), dtype=torch.int64, device=device)
            for cell, value in enumerate(constants):
                if value:
                    base[cell : cell + 1].fill_(value)
            index = torch.zeros(len(positions), dtype=torch.int64, device=device)
            for slot, cell in enumerate(positions):
                if cell:
                    index[slot : slot + 1].fill_(cell)
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[key] = (base, index)
        return layout


_MAX_LAYOUTS = 256  # batch shapes remembered (padding to the longest row makes a few hundred at most)
_EXPONENTS: dict[torch.device, torch.Tensor] = {}


def _exponents(device: torch.device) -> torch.Tensor:
    """[[1], [2]] on ``device``, made once (a host-to-device copy per step would sync)."""
    exponents = _EXPONENTS.get(device)
    if exponents is None:
        exponents = _EXPONENTS[device] = torch.arange(1, 3, dtype=torch.int64, device=device).unsqueeze(1)
    return exponents
