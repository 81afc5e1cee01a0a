"""``flex_attention`` on the replica: counted like SDPA, its hardware FLOPs from its block mask.

Model FLOPs follow the project's attention convention: scores and values over every query-key pair,
as SDPA would count the same sequences (no discount for the blocks a causal or sliding-window mask
skips). Hardware FLOPs are what the kernel computes: every block of the BlockMask it visits, partial
(``kv_num_blocks``) and full (``full_kv_num_blocks``), each Q_BLOCK_SIZE x KV_BLOCK_SIZE per head.

The engine is linear in squared lengths, so the mask enters as one number, its computed share: the
area of the visited blocks over q_len x kv_len, measured once when the engine is built, at the
length of the batch it is built from (a host read of the mask then, never per step). Each step's
hardware attention FLOPs are that share times its model attention FLOPs: exact at the build length,
and at other lengths as if the mask kept its shape. A probe's mask is built on the meta device and
holds no values, so the share comes from the mask's ``mask_mod`` evaluated on the CPU at the build
length; a ``mask_mod`` that cannot run there (it reads tensors of the batch), or whose dense mask at
that length would pass 2**28 entries, counts as dense (share 1). A transformers model with
``attn_implementation="flex_attention"`` builds its mask per step inside its forward: the replica runs
it with eager attention, so its hardware FLOPs count every pair, as SDPA with a mask computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..._torch_internals import (
    FLEX_MASK_BLOCK_SIZES,
    FLEX_MASK_FULL_KV_NUM_BLOCKS,
    FLEX_MASK_KV_NUM_BLOCKS,
    FLEX_MASK_LENGTHS,
    FLEX_MASK_MOD,
)
from .substitutes import _Opaque

# create_block_mask on the CPU holds the dense boolean mask of (batch, heads, length, length) entries.
_MAX_MASK_ELEMENTS = 1 << 28


class AttentionRecorder(Protocol):
    """Where the kernel records: the current probe's ``MatmulRecorder``."""

    def record_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, share: float
    ) -> None: ...


def computed_share(
    kv_num_blocks: torch.Tensor, full_kv_num_blocks: torch.Tensor | None, block_mask: tuple
) -> float:
    """Visited block area over the mask's q_len x kv_len, averaged over its (batch, head) entries."""
    q_len, kv_len = block_mask[FLEX_MASK_LENGTHS]
    q_block, kv_block = block_mask[FLEX_MASK_BLOCK_SIZES]
    blocks = kv_num_blocks.sum().item()  # a host read: real mask tensors, at engine build only
    if full_kv_num_blocks is not None:
        blocks += full_kv_num_blocks.sum().item()
    entries = kv_num_blocks.shape[0] * kv_num_blocks.shape[1]
    return blocks * q_block * kv_block / (entries * q_len * kv_len)


class FlexKernel:
    """Stands in for flex_attention's higher-order op on meta tensors: records, computes nothing."""

    def __init__(self, recorder: Callable[[], AttentionRecorder], build_length: int | None) -> None:
        self._recorder = recorder
        self._build_length = build_length
        self._shares: dict[tuple, float] = {}

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        score_mod: Any,
        block_mask: tuple,
        scale: float,
        kernel_options: dict,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, heads, q_len, _ = query.shape
        output = _Opaque.apply(torch.Size((batch, heads, q_len, value.shape[-1])), query, query, key, value)
        statistics = torch.empty((batch, heads, q_len), dtype=torch.float32, device=query.device)
        share = self._share(block_mask) if block_mask[FLEX_MASK_LENGTHS] == (q_len, key.shape[-2]) else 1.0
        self._recorder().record_attention(query, key, value, output, share)
        return output, statistics, statistics.clone()

    def _share(self, block_mask: tuple) -> float:
        """The computed share of a mask made for these lengths (without one, flex_attention's own mask
        is of another length and visits every block: share 1)."""
        kv_num_blocks, full_kv_num_blocks = (
            block_mask[FLEX_MASK_KV_NUM_BLOCKS],
            block_mask[FLEX_MASK_FULL_KV_NUM_BLOCKS],
        )
        if kv_num_blocks.device.type != "meta":
            return computed_share(kv_num_blocks, full_kv_num_blocks, block_mask)
        mask_mod = block_mask[FLEX_MASK_MOD]
        q_len, kv_len = block_mask[FLEX_MASK_LENGTHS]
        if self._build_length is None or q_len != kv_len or mask_mod is None:
            return 1.0
        key = (_identity(mask_mod), tuple(kv_num_blocks.shape[:2]), block_mask[FLEX_MASK_BLOCK_SIZES])
        if key not in self._shares:
            self._shares[key] = self._share_at_build_length(
                mask_mod, kv_num_blocks.shape, block_mask, self._build_length
            )
        return self._shares[key]

    def _share_at_build_length(
        self, mask_mod: Callable, shape: torch.Size, block_mask: tuple, length: int
    ) -> float:
        from torch.nn.attention.flex_attention import create_block_mask

        if shape[0] * shape[1] * length * length > _MAX_MASK_ELEMENTS:
            return 1.0
        try:
            real = create_block_mask(
                mask_mod,
                shape[0],
                shape[1],
                length,
                length,
                device="cpu",
                BLOCK_SIZE=block_mask[FLEX_MASK_BLOCK_SIZES],
            )
        except Exception:  # noqa: BLE001 - a mask_mod that reads the batch's (meta) tensors cannot run here
            return 1.0
        if real.kv_num_blocks.device.type == "meta":  # ... or it ran, on them, and gave no values
            return 1.0
        return computed_share(real.kv_num_blocks, real.full_kv_num_blocks, real.as_tuple())


def _identity(mask_mod: Callable) -> tuple:
    """A probe builds its mask_mod anew each call: the same code over the same values is the same mask."""
    cells = getattr(mask_mod, "__closure__", None) or ()
    values = tuple(
        cell.cell_contents
        if isinstance(cell.cell_contents, (bool, int, float, str))
        else id(cell.cell_contents)
        for cell in cells
    )
    return (getattr(mask_mod, "__code__", id(mask_mod)), values)
