"""What share of each matmul this rank runs: the copy runs the whole model and counts the rank's share.

MFU sums every rank's FLOPs (``distributed.py``), so each rank must count the matmuls it runs:

- data parallel sharding (FSDP1, FSDP2, DeepSpeed ZeRO-3) gathers the whole parameter before the
  forward: the rank runs every matmul whole, on its own batch (the copy takes ZeRO-3's full shape
  from ``ds_shape``, FSDP1's from its flat parameter, a DTensor's from its global shape);
- tensor parallel (``parallelize_module``) keeps a shard of a weight, and DTensor runs each matmul on
  the local shards: a ``Shard(d)`` placement on a mesh dimension of size n leaves the rank its
  ``torch.chunk`` share of dimension d (1/n when it divides evenly), and that share of the matmul.
  A weight sharded along the matmul's output (column-wise) leaves the rank that share of the
  output: what follows from it alone (the attention of the rank's heads, the MLP's activation) runs
  on that share too, until a matmul contracts it (row-wise) back to a whole output.

A DTensor parameter that FSDP2 manages spans FSDP2's mesh dimensions and the tensor-parallel ones;
FSDP2 gathers its own, so only the tensor-parallel placements (the spec it gathers back to) count.

A weight that tensor parallel leaves whole (a module outside the plan, or ``Replicate``) multiplies
the same whole activations on every rank of the tensor-parallel group: each runs the matmul, but
the batch needs it once. Each rank counts its share of the model FLOPs (1/n on n ranks) and the
whole matmul as hardware FLOPs (``Replica.copies``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._torch_internals import fsdp2_unsharded_specs, view_base
from .unwrap import unwrap_model


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (matched by name: torch.distributed is never imported here)."""
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def local_shape(shape: torch.Size, mesh: Any, placements: Any) -> torch.Size:
    """The shape this rank holds of a tensor of global ``shape`` sharded by ``placements`` over ``mesh``."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing of it
        return torch.Size([0] * len(shape))
    sizes = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if not placement.is_shard():
            continue
        dim = placement.dim % len(sizes)
        chunks = mesh.size(mesh_dim)
        chunk = -(-sizes[dim] // chunks)  # torch.chunk: ceil-sized chunks, the last ones short or empty
        start = chunk * coordinate[mesh_dim]
        sizes[dim] = max(0, min(sizes[dim], start + chunk) - start)
    return torch.Size(sizes)


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The whole shape of a possibly sharded parameter (ZeRO-3 keeps it in ``ds_shape``; a DTensor's
    shape is its global one)."""
    ds_shape = getattr(tensor, "ds_shape", None)
    return torch.Size(ds_shape) if ds_shape is not None else tensor.shape


@dataclass(frozen=True)
class Shard:
    """A parameter of which this rank multiplies with a part: its full and its local shape."""

    full: torch.Size
    local: torch.Size

    @property
    def fraction(self) -> float:
        """The share of each matmul with this parameter that this rank runs."""
        return self.local.numel() / max(self.full.numel(), 1)

    def splits(self, view: torch.Tensor, dim: int) -> bool:
        """Whether dimension ``dim`` of ``view`` (the parameter, or a view of it such as the transpose
        ``F.linear`` multiplies by) is one this rank holds only part of: matched by stride and size."""
        base = view_base(view)
        size, stride = view.shape[dim], view.stride(dim)
        return any(
            base.stride(d) == stride and self.full[d] == size and self.local[d] < self.full[d]
            for d in range(len(self.full))
        )


class ComputeShapes:
    """Which tensors of a model this rank multiplies with only part of (tensor parallel)."""

    def __init__(self, model: nn.Module) -> None:
        self._fsdp2: dict[int, Any] = {}
        for module in model.modules():
            self._fsdp2.update(fsdp2_unsharded_specs(module))

    @property
    def fsdp2(self) -> bool:
        """Whether FSDP2 (``fully_shard``) manages any parameter of the model."""
        return bool(self._fsdp2)

    def _layout(self, tensor: torch.Tensor) -> tuple[Any, Any] | None:
        """The mesh and placements ``tensor`` computes with; None when it computes whole."""
        if not is_dtensor(tensor):
            return None
        if id(tensor) in self._fsdp2:
            spec = self._fsdp2[id(tensor)]  # None: FSDP2 alone, which gathers it whole
            return None if spec is None else (spec.mesh, spec.placements)
        return tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]

    def shard(self, tensor: torch.Tensor) -> Shard | None:
        """The part of ``tensor`` this rank computes with; None when it computes with all of it."""
        layout = self._layout(tensor)
        if layout is None:
            return None
        local = local_shape(tensor.shape, *layout)
        return Shard(tensor.shape, local) if local != tensor.shape else None

    def tensor_parallel(self, parameters: Iterable[torch.Tensor]) -> int:
        """Ranks that split the model's sharded matmuls: the most any of ``parameters`` is split over
        where it computes (1 without tensor parallel)."""
        return max((self.ranks_sharing(parameter) for parameter in parameters), default=1)

    def ranks_sharing(self, tensor: torch.Tensor) -> int:
        """How many ranks split the matmuls with ``tensor``: the sizes of the mesh dimensions it is
        sharded over where it computes (1 for a tensor computed whole)."""
        layout = self._layout(tensor)
        if layout is None:
            return 1
        mesh, placements = layout
        ranks = 1
        for mesh_dim, placement in enumerate(placements):
            if placement.is_shard():
                ranks *= mesh.size(mesh_dim)
        return ranks


def tensor_parallel_degree(model: nn.Module) -> int:
    """Ranks of ``model``'s (any wrapper's) tensor-parallel group; 1 without tensor parallel."""
    return ComputeShapes(unwrap_model(model)).tensor_parallel(model.parameters())
