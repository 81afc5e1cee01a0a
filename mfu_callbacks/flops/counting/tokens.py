"""Reduce a batch to its feature vector (see ``features.py``) without a host sync.

Lengths come from the attention mask; packed rows (restarting ``position_ids``, or ``cu_seq_lens``
from Hugging Face's flattening collator) count attention per document: the sum of l**2 over
documents equals the sum over real tokens of (2 * position + 1), which needs no host round trip.
TRL's padding-free collator with ``pad_to_multiple_of`` ends a flattened row with pad tokens that
each look like a one-token document (position 0); they count as padding (``layouts.trailing_pads``).
Layers with a window of keys (``windows.py``) count their window's squares, per document too.

Which tensors a batch holds, their shapes and dtypes decide everything else once per layout
(``layouts.Plan``): per micro-batch the training step pays a dictionary lookup and, in most layouts,
one operation on the device (``TokenCounting.defer``); the meter turns what it took into features
when it reads them (``_step_counts.py``). ``count`` does both at once, for tools and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..features import CALLS_INDEX, HARDWARE, MODEL, WINDOW_FEATURES, Feature
from .attention_windows import AttentionWindow
from .layouts import IGNORED_LABEL, BatchError, Counting, Tensors, make_plan
from .plans import WIDTH, Group, Plan, StreamShape, cell

MAIN_KEYS = ("input_ids", "inputs_embeds")
DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")
IMAGE_KEYS = ("pixel_values", "images", "image")
# Image sizes in patches, (images, 3), whose values the model reads (Qwen2-VL's vision tower and M-RoPE).
GRID_KEYS = ("image_grid_thw",)
PACKED_KEYS = ("cu_seq_lens_q", "cu_seqlens", "cu_seqlens_q")
# Where a decoder-only batch says which positions are scored, first found wins: (key, not yet shifted
# to the next token, the value of a position without a label). TRL's DPO batch has ``completion_mask``
# (the labels are made from it inside the step); its SFT collator folds its masks into ``labels``.
LABELLED_KEYS = (
    ("shift_labels", False, IGNORED_LABEL),
    ("labels", True, IGNORED_LABEL),
    ("completion_mask", True, 0),
    ("assistant_masks", True, 0),
)

TokenCounter = Callable[[Any], Mapping[str, torch.Tensor]]

__all__ = ["BatchError", "TokenCounter", "TokenCounting"]

_MAX_LAYOUTS = 256  # layouts remembered (padding to the longest row makes a few hundred at most)


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


def _find(batch: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        if isinstance(batch.get(key), torch.Tensor):
            return key
    return None


class TokenCounting:
    """Counts batches of one model: which keys hold the streams, and how attention ran."""

    def __init__(
        self,
        *,
        encoder_decoder: bool,
        attention_per_document: bool,
        token_counter: TokenCounter | None = None,
        pad_token_id: int | None = None,
        windows: tuple[AttentionWindow, ...] = (),
        kernel_windows: tuple[AttentionWindow | None, ...] | None = None,
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
        self._settings = Counting(attention_per_document, pad_token_id, windows, self.kernel_windows)
        self._plans: dict[tuple, Plan] = {}
        self._groups: dict[tuple, Group] = {}
        self.counts_labelled = True  # whether plans take the labelled positions (``count_labelled``)

    def count_labelled(self, needed: bool) -> None:
        """Whether plans take which positions have a label (``Feature.LABELLED``). A FLOP engine whose
        head computes every position never reads them, and taking them is an operation on the device
        per micro-batch; held micro-batches keep their own plans."""
        if needed != self.counts_labelled:
            self.counts_labelled = needed
            self._plans.clear()
            self._groups.clear()

    # -- per micro-batch ---------------------------------------------------------------------------
    def defer(self, batch: Any) -> tuple[Plan, tuple[torch.Tensor, ...]]:
        """The batch's plan and the tensors it takes (new tensors, never the batch's own): what
        ``Plan.features`` or ``Group.reduce`` turn into features later. No host sync."""
        view = self.token_counter(batch) if self.token_counter is not None else batch
        if isinstance(view, Mapping):
            key: tuple = tuple(
                [
                    (name, value.shape, value.dtype, value.device)
                    for name, value in view.items()
                    if isinstance(value, torch.Tensor)
                ]
            )
        else:
            tensor = _first_tensor(view)
            key = (type(view),) if tensor is None else (type(view), tensor.shape, tensor.dtype, tensor.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(view)
            if len(self._plans) >= _MAX_LAYOUTS:
                self._plans.clear()
                self._groups.clear()
            self._plans[key] = plan
        return plan, plan.take(view)

    def count(self, batch: Any) -> torch.Tensor:
        """The batch's (2, NUM_FEATURES) int64 feature tensor, on the batch's device, with no host sync."""
        plan, owned = self.defer(batch)
        return plan.features(owned)

    def streams(self, batch: Any) -> tuple[StreamShape | None, StreamShape | None, int, torch.device]:
        """The main stream's and the decoder stream's shapes, the row count of a batch, and its device."""
        view = self.token_counter(batch) if self.token_counter is not None else batch
        plan = self._plan(view)
        return plan.main, plan.decoder, plan.rows, plan.device

    # -- once per layout ---------------------------------------------------------------------------
    def _plan(self, view: Any) -> Plan:
        if isinstance(view, Mapping):
            main_key = _find(view, MAIN_KEYS)
            decoder_key = _find(view, DECODER_KEYS)
            if decoder_key is None and self.encoder_decoder and _find(view, ("labels",)):
                decoder_key = "labels"
            if main_key is None and decoder_key is None:
                image_key = _find(view, IMAGE_KEYS)
                if image_key is not None:
                    images = view[image_key]
                    return _rows_only(images.shape[0], images.device)
                raise BatchError(
                    f"cannot count tokens in a batch with keys {sorted(view)}: looked for "
                    f"{', '.join(MAIN_KEYS + IMAGE_KEYS)}. Pass token_counter=fn, where fn(batch) returns a dict "
                    "with 'input_ids' (and 'attention_mask' if the batch is padded)."
                )
            decoder_mask_key = _find(view, ("decoder_attention_mask",)) if decoder_key else None
            if decoder_key == "labels" and decoder_mask_key is None:
                decoder_mask_key = "labels"  # positions whose label is not ignored
            labelled = (
                _labelled(view, view[main_key])
                if main_key and not decoder_key and self.counts_labelled
                else None
            )
            found = Tensors(
                ids=view[main_key] if main_key else None,
                ids_key=main_key,
                mask_key=_find(view, ("attention_mask",)) if main_key else None,
                positions_key=_find(view, ("position_ids",)) if main_key else None,
                boundaries_key=_find(view, PACKED_KEYS) if main_key else None,
                decoder_ids=view[decoder_key] if decoder_key else None,
                decoder_mask_key=decoder_mask_key,
                **(labelled or {}),
            )
            first = found.ids if found.ids is not None else found.decoder_ids
            assert first is not None
            return make_plan(view, found, first.shape[0], first.device, self._settings, self._groups)
        tensor = _first_tensor(view)
        if tensor is None or tensor.dim() == 0:
            raise BatchError(
                f"cannot count tokens in a batch of type {type(view).__name__}: it holds no tensor with a batch "
                "dimension. Pass token_counter=fn, where fn(batch) returns a dict with 'input_ids'."
            )
        if tensor.dim() == 2 and not tensor.is_floating_point():
            found = Tensors(ids=tensor)
            return make_plan(view, found, tensor.shape[0], tensor.device, self._settings, self._groups)
        return _rows_only(tensor.shape[0], tensor.device)


def _labelled(view: Mapping[str, Any], ids: torch.Tensor) -> dict[str, Any] | None:
    """Where the batch's labelled positions are read (``LABELLED_KEYS``): a per-token tensor of the
    main stream's rows and length; a per-row label (sequence classification) is none."""
    for key, shifted, unlabelled in LABELLED_KEYS:
        value = view.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape[:2]:
            return {"labelled_key": key, "labelled_shifted": shifted, "unlabelled": unlabelled}
    return None


def _rows_only(rows: int, device: torch.device) -> Plan:
    """A batch without token streams (images, tables): everything scales by rows."""
    constants = [0] * WIDTH
    for row in (MODEL, HARDWARE):
        constants[cell(row, Feature.ROWS)] = rows
        constants[cell(row, CALLS_INDEX)] = 1
    return Plan(rows=rows, device=device, constants=tuple(constants))
