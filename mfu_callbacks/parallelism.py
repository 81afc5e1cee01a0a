"""How a model is spread over the ranks, read from its parameters: for whoever reports per-rank sums.

The meter sums FLOPs and tokens over every rank. FLOPs add up right under any layout, because each
rank counts the matmuls it runs (``flops/sharding.py``). Tokens do not under tensor parallel: the
ranks of one tensor-parallel group run the same batch, so a sum over all ranks counts each token
``tensor_parallel`` times. ``data_parallel`` is the number of distinct batches a step sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._torch_internals import fsdp1_inner_module
from .distributed import world_size as group_size
from .flops.sharding import ComputeShapes
from .flops.unwrap import unwrap_model


@dataclass(frozen=True)
class Parallelism:
    """The degrees of one model's layout on this rank's process group."""

    world_size: int
    tensor_parallel: int  # ranks that split each sharded matmul (and run the same batch)
    sharding: str | None  # how data-parallel ranks shard the weights: "fsdp1", "fsdp2", "zero3", or None

    @property
    def data_parallel(self) -> int:
        """Ranks (groups of ranks, under tensor parallel) that run different batches."""
        return max(self.world_size // self.tensor_parallel, 1)


def parallelism(model: nn.Module, world_size: int | None = None) -> Parallelism:
    """The layout of ``model`` (any wrapper); ``world_size`` defaults to the default process group's."""
    shapes = ComputeShapes(unwrap_model(model))
    parameters = list(model.parameters())
    tensor_parallel = max((shapes.ranks_sharing(p) for p in parameters), default=1)
    sharding = None
    if any(fsdp1_inner_module(module) is not None for module in model.modules()):
        sharding = "fsdp1"
    elif shapes.fsdp2:
        sharding = "fsdp2"
    elif any(hasattr(p, "ds_id") for p in parameters):
        sharding = "zero3"
    return Parallelism(world_size if world_size is not None else group_size(), tensor_parallel, sharding)
