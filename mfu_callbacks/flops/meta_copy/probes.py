"""Probe batches: meta-device batches shaped like the user's, at the few sizes the copy is traced at.

The sizes (rows, main length, decoder length) are distinct enough that the design matrix of the fit
(``fit.py``) has full rank, and shorter than any attention window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..counting.tokens import DECODER_KEYS, GRID_KEYS, IMAGE_KEYS, MAIN_KEYS, PACKED_KEYS, TokenCounting
from .isolation import map_tensors

Forward = Callable[[nn.Module, Any], Any]


# Probe shapes (rows, main length, decoder length): distinct enough that the design matrix has full rank.
PROBES_MAIN = ((1, 5, 0), (1, 7, 0), (1, 9, 0), (2, 5, 0), (3, 7, 0), (2, 8, 0))
PROBES_ENCODER_DECODER = (
    (1, 5, 3),
    (1, 7, 3),
    (1, 9, 4),
    (2, 5, 6),
    (1, 5, 6),
    (3, 7, 4),
    (2, 9, 3),
    (1, 6, 7),
    (2, 7, 7),
)
PROBES_ROWS = ((1, 0, 0), (2, 0, 0), (3, 0, 0))


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How a batch reaches a model: keywords for a mapping, the first element for a tuple."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _resize(tensor: torch.Tensor, rows: int, length: int | None) -> torch.Tensor:
    shape = [rows, *tensor.shape[1:]]
    if length is not None and tensor.dim() >= 2:
        shape[1] = length
    return torch.empty(shape, dtype=tensor.dtype, device="meta")


def _extended(tensor: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """The template's first row on the CPU, its last column repeated up to ``length``, once per row."""
    row = tensor[:1].cpu()
    extra = length - row.shape[1]
    if extra > 0:
        row = torch.cat([row, row[:, -1:].expand(1, extra, *row.shape[2:])], dim=1)
    return row[:, :length].repeat(rows, *[1] * (row.dim() - 1))


class ProbeBatches:
    """Makes meta-device batches shaped like the user's, at the probe sizes.

    Tensors with a row per sequence follow the probe's rows; images (``pixel_values``) follow them
    too, k per row where the template has k images a row. So a vision-language model's image work
    (vision tower, projector) is counted per row: exact when every row has the same number of
    images of the same size, as its text tokens (image placeholders included) are counted per token.

    A model that reads its image grids (``image_grid_thw``: Qwen2-VL) gets them as real CPU tensors,
    and with them the integer tensors of the text stream (attention mask, token types), whose values
    place the image tokens: copies of the template's first row, extended with its last (text) column.
    """

    def __init__(self, template: Any, counting: TokenCounting, custom_forward: bool) -> None:
        self.template = template
        self.custom_forward = custom_forward
        main, decoder, self.rows, _ = counting.streams(template)
        self.main_length = main.length if main is not None else None
        self.decoder_length = decoder.length if decoder is not None else None
        self.encoder_decoder = counting.encoder_decoder
        self.grids = isinstance(template, Mapping) and any(
            isinstance(template.get(key), torch.Tensor) for key in GRID_KEYS
        )

    def _stream_of(self, key: str | None, tensor: torch.Tensor) -> str | None:
        if key is not None and (
            key in DECODER_KEYS or key.startswith("decoder_") or (key == "labels" and self.encoder_decoder)
        ):
            return "decoder"
        if tensor.dim() >= 2 and tensor.shape[0] == self.rows and tensor.shape[1] == self.main_length:
            return "main"
        return None

    def _convert(
        self, key: str | None, value: torch.Tensor, rows: int, main: int, decoder: int
    ) -> torch.Tensor:
        per_row = self._items_per_row(key, value)
        if per_row is None:
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        if self.grids and key in GRID_KEYS:
            return value[:per_row].cpu().repeat(rows, 1)
        stream = self._stream_of(key, value)
        if (
            self.grids
            and stream == "main"
            and key not in (*MAIN_KEYS, "labels")
            and not value.is_floating_point()
        ):
            return _extended(value, rows, main)
        length = {"main": main, "decoder": decoder}.get(stream) if stream else None
        return _resize(value, rows * per_row, length)

    def _items_per_row(self, key: str | None, value: torch.Tensor) -> int | None:
        """Entries of the first dimension per row: 1 for per-row tensors, k for k images a row,
        None for a tensor that does not follow the rows."""
        if value.dim() == 0:
            return None
        if value.shape[0] == self.rows:
            return 1
        if key in (*IMAGE_KEYS, *GRID_KEYS) and value.shape[0] % self.rows == 0:
            return value.shape[0] // self.rows
        return None

    def make(self, rows: int, main: int, decoder: int) -> Any:
        """A batch of the template's layout at the probe's sizes, every tensor in it (nested too) on meta."""
        batch = self.template
        if isinstance(batch, Mapping) and not self.custom_forward:
            dropped = ("position_ids", *PACKED_KEYS, "max_length_q", "max_length_k")
            batch = {k: v for k, v in batch.items() if k not in dropped}
        return map_tensors(batch, lambda key, tensor: self._convert(key, tensor, rows, main, decoder))
