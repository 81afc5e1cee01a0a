"""How a batch of one layout is counted: which tensors its plan (``plans.py``) takes, and the features
read from them.

The main stream's layouts (``make_plan`` tells them apart):
- "full": no attention mask (or a prepared 4-D one), no positions: every token is real; nothing taken.
- "mask": a 2-D attention mask; taken: its row sums (the real lengths).
- "position_sums", "positions", "positions_pads": packed rows whose ``position_ids`` restart at 0
  per document; the sum over tokens of (2 * position + 1) is the sum of squared document lengths.
  Taken: the positions' row sums; or a copy of the positions, when attention windows need more than
  their sum; or the ids stacked with the positions, when a pad id tells TRL's trailing pads apart
  (``trailing_pads``).
- "boundaries", "boundaries_pads": flattened documents with ``cu_seq_lens``; taken: a copy of the
  boundaries (and the ids stacked with the positions for the pad check).
An encoder-decoder's two masks are taken in one operation (concatenated along the sequence).
A decoder-only batch with labels (or TRL's ``completion_mask``/``assistant_masks``) also takes which
positions have a label for the next token, as booleans (one operation): a head that scores only
those follows them (``Feature.LABELLED``). Once the run's engine is settled and no FLOPs depend on
them, they are no longer taken (``TokenCounting.count_labelled``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..features import CALLS_INDEX, HARDWARE, MODEL, WINDOW_FEATURES, Feature
from .attention_windows import AttentionWindow
from .plans import WIDTH, Column, Derived, Group, Plan, Source, StreamShape, Term, cell, nothing

IGNORED_LABEL = -100  # Hugging Face's label of a position without a loss (decoder padding)


# -- the layouts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counting:
    """What counting needs besides the batch (``TokenCounting``'s settings)."""

    attention_per_document: bool
    pad_token_id: int | None
    windows: tuple[AttentionWindow, ...]
    kernel_windows: tuple[AttentionWindow | None, ...]


def trailing_pads(ids: torch.Tensor, positions: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per row, the pad tokens ending a packed row: the trailing run of tokens at position 0 holding
    the pad id.

    TRL's ``DataCollatorForLanguageModeling(padding_free=True, pad_to_multiple_of=N)`` flattens the
    documents into one row and right-pads it with the pad id at position 0 (labels -100), so each pad
    token is a one-token document to the attention kernels. A genuine one-token document ends the row
    at position 0 too, so the pad id tells them apart: only a last document made of the pad token
    itself is taken for padding. Without a pad id nothing is.
    """
    pads = (ids == pad_token_id) & (positions == 0)
    return per_row(pads.flip(-1).cumprod(-1))  # the run of pads counted back from the end


def per_row(values: torch.Tensor) -> torch.Tensor:
    """Sums over every dimension but the first."""
    return values.flatten(1).sum(1) if values.dim() > 1 else values


class BatchError(ValueError):
    """A batch in which no tokens or rows can be found."""


class _Builder:
    """Collects a plan's constants, owned tensors and their columns."""

    def __init__(self, signature: tuple) -> None:
        self.constants = [0] * WIDTH
        self.takes: list[Callable[[Any], torch.Tensor]] = []
        self.derives: list[Callable[[torch.Tensor], Derived]] = []
        self.provides: dict[str, int] = {}  # derived quantity -> its source
        self.columns: list[list[tuple[int, Column]]] = []
        self.key: list[Any] = [signature]
        self.sizes: list[int] = []
        self.nbytes = 0

    def source(
        self,
        take: Callable[[Any], torch.Tensor],
        owned: torch.Tensor,
        derive: Callable[[torch.Tensor], Derived],
        provides: tuple[str, ...],
    ) -> None:
        """An owned tensor (``owned``: what ``take`` gave for this batch) and the quantities it gives."""
        for name in provides:
            self.provides[name] = len(self.takes)
        self.takes.append(take)
        self.derives.append(derive)
        self.columns.append([])
        self.key.append((tuple(owned.shape[1:]), owned.dtype))
        self.sizes.append(owned.shape[0] if owned.dim() else 1)
        self.nbytes += owned.numel() * owned.element_size()

    def put(self, row: int, feature: int, *terms: Term) -> None:
        for term in terms:
            if isinstance(term, int):
                self.constants[cell(row, feature)] += term
            else:
                name, function = term
                self.columns[self.provides[name]].append((cell(row, feature), _column(name, function)))


def _column(name: str, function: Callable[[torch.Tensor], torch.Tensor]) -> Column:
    return lambda derived: function(derived[name])


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


def _square(values: torch.Tensor) -> torch.Tensor:
    return values * values


def _negative(values: torch.Tensor) -> torch.Tensor:
    return -values


def _twice(values: torch.Tensor) -> torch.Tensor:
    return 2 * values


def _scaled(factor: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda values: values * factor


@dataclass(frozen=True)
class Tensors:
    """The tensors of a batch the layout reads, and the keys they were found under."""

    ids: torch.Tensor | None = None
    ids_key: str | None = None
    mask_key: str | None = None
    positions_key: str | None = None
    boundaries_key: str | None = None
    decoder_ids: torch.Tensor | None = None
    decoder_mask_key: str | None = None  # the decoder's mask, or "labels" read as one (not -100)
    labelled_key: str | None = None  # where the main stream's labelled positions are read
    labelled_shifted: bool = True  # position t is labelled by the value at t + 1 (not yet shifted)
    unlabelled: int = IGNORED_LABEL  # the value of a position without a label (0 in a mask)


def make_plan(
    view: Any,
    found: Tensors,
    rows: int,
    device: torch.device,
    counting: Counting,
    groups: dict[tuple, Group],
) -> Plan:
    """The plan of ``view``'s layout: every decision made here, from keys and shapes, once.

    Long by design: the layouts' decisions (main stream, decoder stream, cross-attention, labels) read
    best in one place, in the order the plan's cells are filled, each a few lines.
    """
    mask = view[found.mask_key] if found.mask_key else None
    positions = view[found.positions_key] if found.positions_key else None
    boundaries = view[found.boundaries_key] if found.boundaries_key else None
    decoder_mask = view[found.decoder_mask_key] if found.decoder_mask_key else None
    main = _shape(found.ids) if found.ids is not None else None
    decoder = _shape(found.decoder_ids) if found.decoder_ids is not None else None
    main_kind = _main_kind(found.ids, mask, positions, boundaries, counting) if main else "none"
    decoder_kind = (
        "none"
        if decoder is None
        else ("full" if decoder_mask is None or decoder_mask.dim() != 2 else _decoder_kind(found))
    )
    paired = main_kind == "mask" and decoder_kind != "full" and decoder_kind != "none"
    extra: tuple[int, ...] = ()
    if main is not None and decoder is not None:
        extra = (main.length, decoder.length)
    build = _Builder((main_kind, decoder_kind, extra, paired, device))
    for row in (MODEL, HARDWARE):
        build.put(row, Feature.ROWS, rows)
        build.put(row, CALLS_INDEX, 1)

    # The owned tensors: one operation each, made here once to learn their shapes.
    if paired:
        assert mask is not None and decoder_mask is not None and main is not None
        if mask.shape[0] != decoder_mask.shape[0]:
            raise BatchError(
                f"the attention mask has {mask.shape[0]} rows and the decoder's {decoder_mask.shape[0]}: "
                "an encoder-decoder batch needs one decoder row per encoder row"
            )
        width, labels = mask.shape[1], decoder_kind == "labels"
        mask_key, decoder_key = found.mask_key, found.decoder_mask_key

        def take_pair(batch: Any) -> torch.Tensor:
            return torch.cat((batch[mask_key], batch[decoder_key]), 1)

        def derive_pair(joined: torch.Tensor) -> Derived:
            decoder_part = joined[:, width:]
            return {
                "main_lengths": joined[:, :width].sum(1, dtype=torch.int64),
                "decoder_lengths": _lengths(decoder_part, labels),
            }

        build.key.append(width)
        build.source(take_pair, take_pair(view), derive_pair, ("main_lengths", "decoder_lengths"))
    else:
        if main_kind == "mask":
            build.source(*_mask_source(found.mask_key, view, "main_lengths", labels=False))
        if decoder_kind in ("mask", "labels"):
            build.source(
                *_mask_source(found.decoder_mask_key, view, "decoder_lengths", decoder_kind == "labels")
            )
    if main_kind in ("position_sums", "positions", "positions_pads"):
        build.source(*_positions_source(main_kind, found, view, counting))
    if main_kind in ("boundaries", "boundaries_pads"):
        boundaries_key = found.boundaries_key

        if boundaries is not None and boundaries.dim() == 1:

            def take_boundaries(batch: Any) -> torch.Tensor:
                return batch[boundaries_key].clone()
        else:

            def take_boundaries(batch: Any) -> torch.Tensor:
                return batch[boundaries_key].reshape(-1).clone()

        build.source(take_boundaries, take_boundaries(view), _documents, ("documents",))
        if main_kind == "boundaries_pads":
            build.source(*_positions_source("positions_pads", found, view, counting))

    if main is not None:
        _main_stream(build, main_kind, main, positions, counting)
    if found.labelled_key is not None:
        build.source(*_labelled_source(found, view))
        for row in (MODEL, HARDWARE):  # the head computes exactly these, padding never labelled
            build.put(row, Feature.LABELLED, ("labelled", _identity))
    if decoder is not None:
        decoder_lengths: Term = ("decoder_lengths", _identity)
        real = decoder_kind in ("mask", "labels")
        build.put(MODEL, Feature.DECODER_TOKENS, decoder_lengths if real else decoder.rows * decoder.length)
        build.put(
            MODEL,
            Feature.DECODER_SQUARES,
            ("decoder_lengths", _square) if real else decoder.rows * decoder.length**2,
        )
        build.put(HARDWARE, Feature.DECODER_TOKENS, decoder.rows * decoder.length)
        build.put(HARDWARE, Feature.DECODER_SQUARES, decoder.rows * decoder.length**2)
    if main is not None and decoder is not None:
        _cross(build, main_kind, decoder_kind, main, decoder, rows)

    key = tuple(build.key)
    group = None
    if build.takes:
        group = groups.get(key)
        if group is None:
            sources = tuple(
                Source(derive, tuple(columns)) for derive, columns in zip(build.derives, build.columns)
            )
            group = groups[key] = Group(sources, device)
    takes = tuple(build.takes)
    take: Callable[[Any], tuple[torch.Tensor, ...]]
    if not takes:
        take = nothing
    elif len(takes) == 1:
        only = takes[0]

        def take(batch: Any) -> tuple[torch.Tensor, ...]:
            return (only(batch),)
    else:

        def take(batch: Any) -> tuple[torch.Tensor, ...]:
            return tuple(function(batch) for function in takes)

    return Plan(
        rows=rows,
        device=device,
        constants=tuple(build.constants),
        take=take,
        group=group,
        sizes=tuple(build.sizes),
        nbytes=build.nbytes,
        main=main,
        decoder=decoder,
    )


def _shape(ids: torch.Tensor) -> StreamShape:
    if ids.dim() < 2 or ids.shape[0] <= 0 or ids.shape[1] <= 0:
        raise BatchError(
            f"a batch of shape {tuple(ids.shape)} has no tokens to count (rows and sequence length "
            "must be positive): an empty batch has no training step to measure"
        )
    return StreamShape(ids.shape[0], ids.shape[1])


def _main_kind(
    ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    boundaries: torch.Tensor | None,
    counting: Counting,
) -> str:
    pad_check = (
        counting.pad_token_id is not None
        and positions is not None
        and ids is not None
        and not ids.is_floating_point()
        and positions.shape == ids.shape
    )
    if boundaries is not None:
        return "boundaries_pads" if pad_check else "boundaries"
    if mask is not None:
        return "mask" if mask.dim() == 2 else "full"  # a prepared 4-D mask: nothing to read lengths from
    if positions is not None:
        if pad_check:
            return "positions_pads"
        return "positions" if counting.windows or positions.dim() < 2 else "position_sums"
    return "full"


def _decoder_kind(found: Tensors) -> str:
    return "labels" if found.decoder_mask_key == "labels" else "mask"


def _lengths(mask: torch.Tensor, labels: bool) -> torch.Tensor:
    """Real lengths per row of a mask, or of labels (positions whose label is not ignored)."""
    return (mask != IGNORED_LABEL).sum(1) if labels else mask.sum(1, dtype=torch.int64)


def _mask_source(
    key: str | None, view: Any, name: str, labels: bool
) -> tuple[Callable[[Any], torch.Tensor], torch.Tensor, Callable[[torch.Tensor], Derived], tuple[str, ...]]:
    """A mask's row sums (one reduction), or a copy of the labels (read as a mask later)."""
    if labels:

        def take(batch: Any) -> torch.Tensor:
            return batch[key].clone()

        def derive(joined: torch.Tensor) -> Derived:
            return {name: _lengths(joined, labels=True)}
    else:

        def take(batch: Any) -> torch.Tensor:
            return batch[key].sum(1, dtype=torch.int64)

        def derive(joined: torch.Tensor) -> Derived:
            return {name: joined}

    return take, take(view), derive, (name,)


def _positions_source(
    kind: str, found: Tensors, view: Any, counting: Counting
) -> tuple[Callable[[Any], torch.Tensor], torch.Tensor, Callable[[torch.Tensor], Derived], tuple[str, ...]]:
    positions_key, ids_key, pad = found.positions_key, found.ids_key, counting.pad_token_id
    if kind == "position_sums":  # without windows or pads the sum of the positions is all it takes

        def take(batch: Any) -> torch.Tensor:
            return batch[positions_key].sum(-1, dtype=torch.int64)

        def derive(joined: torch.Tensor) -> Derived:
            return {"position_sums": per_row(joined)}

        return take, take(view), derive, ("position_sums",)
    if kind == "positions":

        def take(batch: Any) -> torch.Tensor:
            return batch[positions_key].clone()

        def derive(joined: torch.Tensor) -> Derived:
            return {"positions": joined.long()}

        return take, take(view), derive, ("positions",)
    assert pad is not None

    def take_pair(batch: Any) -> torch.Tensor:
        return torch.stack((batch[ids_key], batch[positions_key]), 1)

    def derive_pair(joined: torch.Tensor) -> Derived:
        ids, positions = joined[:, 0], joined[:, 1]
        return {"positions": positions.long(), "pads": trailing_pads(ids, positions, pad)}

    return take_pair, take_pair(view), derive_pair, ("positions", "pads")


def _labelled_source(
    found: Tensors, view: Any
) -> tuple[Callable[[Any], torch.Tensor], torch.Tensor, Callable[[torch.Tensor], Derived], tuple[str, ...]]:
    """Which positions have a label for the next token, as booleans (one operation); summed later.

    A causal LM's head scores position t against the token at t + 1: the labels (or TRL's masks) from
    the second position on, as TRL's fused head and Hugging Face's loss shift them; ``shift_labels``
    are shifted already.
    """
    key, shifted, unlabelled = found.labelled_key, found.labelled_shifted, found.unlabelled

    def take(batch: Any) -> torch.Tensor:
        return batch[key].ne(unlabelled)

    def derive(joined: torch.Tensor) -> Derived:
        return {"labelled": per_row(joined[:, 1:] if shifted else joined)}

    return take, take(view), derive, ("labelled",)


def _documents(joined: torch.Tensor) -> Derived:
    """Document lengths from boundaries concatenated over batches: the step from one batch's last
    boundary to the next one's first (0) is negative and clamped to a length of 0, which adds nothing."""
    return {"documents": (joined[1:] - joined[:-1]).long().clamp(min=0)}


def _main_stream(
    build: _Builder, kind: str, main: StreamShape, positions: torch.Tensor | None, counting: Counting
) -> None:
    """Tokens, squares and window squares of the main stream: real ones (model) and computed ones
    (hardware); attention per document (packed rows under a kernel that takes them) computes only the
    documents' squares."""
    rows, length = main.rows, main.length
    full = rows * length * length
    pads: Term | None = None
    per_document = False
    tokens: Term
    squares: tuple[Term, ...]
    if kind == "full":
        tokens, squares = rows * length, (full,)

        def window_squares(window: AttentionWindow) -> Term:
            return rows * window.squares(length)
    elif kind == "mask":
        tokens, squares = ("main_lengths", _identity), (("main_lengths", _square),)

        def window_squares(window: AttentionWindow) -> Term:
            return ("main_lengths", window.squares)
    elif kind in ("boundaries", "boundaries_pads"):
        per_document = counting.attention_per_document
        tokens, squares = ("documents", _identity), (("documents", _square),)

        def window_squares(window: AttentionWindow) -> Term:
            return ("documents", window.squares)
    else:  # packed positions: the sum of (2 * position + 1) over tokens is the documents' squares
        assert positions is not None
        per_document = counting.attention_per_document
        tokens = rows * length
        numel = positions.numel()
        if kind == "position_sums":
            squares = (numel, ("position_sums", _twice))
        else:
            squares = (numel, ("positions", lambda p: per_row(2 * p)))

        def window_squares(window: AttentionWindow) -> Term:
            return ("positions", lambda p: per_row(window.position_squares(p)))

    if kind in ("positions_pads", "boundaries_pads"):
        pads = ("pads", _negative)
    less_pads = (pads,) if pads is not None else ()
    hardware_squares = squares if per_document else (full,)
    build.put(MODEL, Feature.TOKENS, tokens, *less_pads)
    build.put(MODEL, Feature.SQUARES, *squares, *less_pads)
    build.put(HARDWARE, Feature.TOKENS, rows * length)
    build.put(HARDWARE, Feature.SQUARES, *hardware_squares)
    for feature, window, kernel in zip(WINDOW_FEATURES, counting.windows, counting.kernel_windows):
        build.put(MODEL, feature, window_squares(window), *less_pads)
        if kernel is None:  # every square under a mask
            build.put(HARDWARE, feature, *hardware_squares)
        elif per_document:
            build.put(HARDWARE, feature, window_squares(kernel))
        else:
            build.put(HARDWARE, feature, rows * kernel.squares(length))


def _cross(
    build: _Builder, main_kind: str, decoder_kind: str, main: StreamShape, decoder: StreamShape, rows: int
) -> None:
    """Cross-attention: encoder length times decoder length per row, real and computed."""
    main_lengths = main_kind == "mask"
    decoder_lengths = decoder_kind in ("mask", "labels")
    if main_lengths and decoder_lengths:  # both in one owned tensor (the masks, concatenated)
        build.columns[build.provides["main_lengths"]].append((cell(MODEL, Feature.CROSS), _product))
    elif main_lengths:
        build.put(MODEL, Feature.CROSS, ("main_lengths", _scaled(decoder.length)))
    elif decoder_lengths:
        build.put(MODEL, Feature.CROSS, ("decoder_lengths", _scaled(main.length)))
    else:
        build.put(MODEL, Feature.CROSS, rows * main.length * decoder.length)
    build.put(HARDWARE, Feature.CROSS, rows * main.length * decoder.length)


def _product(derived: Derived) -> torch.Tensor:
    return derived["main_lengths"] * derived["decoder_lengths"]
