"""Under tensor parallel, the share of each matmul this rank runs (see ``MatmulRecorder``, ``sharding.py``).

A mixin of ``MatmulRecorder``: ``shards`` (parameter id -> ``Shard``) and ``copies`` (parameter id ->
ranks that run its matmuls whole on the same batch) are set by the recorder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..._torch_internals import view_base
from ..matmul_ops import CONVOLUTIONS, operands
from ..sharding import Shard
from .isolation import tensors_in


class RankShares:
    """The share of each tensor this rank holds where it is a part (tensor parallel): absent means all."""

    _shards: Mapping[int, Shard]
    _copies: Mapping[int, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _copies_of(self, *operands: Any) -> int:
        """Ranks that run this matmul alike, by its weight (1 unless it is replicated under tensor parallel)."""
        for operand in operands:
            if isinstance(operand, torch.Tensor):
                copies = self._copies.get(id(view_base(operand)))
                if copies:
                    return copies
        return 1

    def _local_share(self, func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        """The share of this op that the rank runs, and (noted on its outputs) the share of them it holds.

        A matmul with a sharded weight runs the weight's share; its output is held in that share when
        the weight is split along the output's dimension (column-wise), whole when along the contracted
        one (row-wise: the partial sums are reduced). Any other op runs on, and holds, the least share
        of its inputs: a part derived from a part, combined with whole tensors, stays that part.
        """
        held = min((self._held.get(t, 1.0) for t in tensors_in((args, kwargs))), default=1.0)
        local = output_held = held
        pair = operands(func, args)
        if pair is not None and func.overloadpacket not in CONVOLUTIONS:
            first, second = pair
            for operand, output_dim in ((second, -1), (first, -2)):
                shard = self._shards.get(id(view_base(operand)))
                if shard is not None:
                    local = shard.fraction
                    output_held = shard.fraction if shard.splits(operand, output_dim) else 1.0
                    break
        if output_held < 1.0:
            for tensor in tensors_in(out):
                self._held[tensor] = output_held
        return local
