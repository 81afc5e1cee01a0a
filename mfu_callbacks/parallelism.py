"""How the training job splits its work, read from the model: data-parallel size and model-parallel degrees.

MFU divides by every GPU of the job whatever the split, so the split changes no formula. It changes
two things the meter reports:

- tokens: every rank of a tensor-parallel group runs the same batch, so summing the ranks' tokens
  counts each batch once per TP rank. The meter divides each rank's tokens by the TP degree:
  ``tokens_per_sec_per_gpu`` is then the global batch's tokens / (seconds x all GPUs), as in
  torchtitan's ``tps`` (local tokens / (seconds x non-data-parallel size), the same number).
- the straggler view: ranks that share a batch (a TP, context- or pipeline-parallel group) wait for
  each other inside every step, so their step times say nothing about who is late. The spread that
  matters is between the groups of the data-parallel dimension (see ``_window.combine_ranks``).

The degrees come from the parameters: DTensor parameters carry their ``device_mesh``, whose
dimension names say the role (Lightning: ``data_parallel``/``tensor_parallel``; Accelerate and
torchtitan: ``dp_replicate``/``dp_shard``/``cp``/``tp``/``pp``); an unnamed or unknown dimension
counts as data parallel (its tokens are then never divided), unless the FLOP engine finds the
ranks of a one-dimensional mesh splitting matmuls (``flops/sharding.py``): then it is tensor
parallel. FSDP1, DDP and DeepSpeed ZeRO-3 wrappers say the rest. Nothing here runs per step or
holds a collective.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed
from .flops.sharding import tensor_parallel_degree

# Mesh dimension names and the role they give; matched on the lower-cased name, first match wins
# (flattened names such as "dp_shard_cp" are data parallel: FSDP shards over them).
_ROLE_OF_NAME = (
    (("tp", "tensor"), "tensor"),
    (("pp", "pipeline"), "pipeline"),
    (("dp", "data", "fsdp", "ddp", "hsdp", "shard", "replicate"), "data"),
    (("cp", "context"), "context"),
)
_MODEL_PARALLEL_ROLES = ("tensor", "context", "pipeline")  # ranks of these dimensions share a batch


@dataclass(frozen=True)
class Parallelism:
    """The split of one training job over its ranks, as this rank sees it.

    engine: the data-parallel wrapper: "fsdp2", "fsdp1", "zero3" (DeepSpeed), "ddp", or "none".
    data_parallel: groups that take different batches (world size / the model-parallel degrees).
    fsdp_shard / dp_replicate: how the data-parallel ranks hold the parameters (shard x replicate).
    batch_group: the global ranks that run this rank's batch (itself alone without model parallelism).
    mesh: the named dimensions of the device meshes seen, and their sizes.
    """

    world_size: int = 1
    engine: str = "none"
    data_parallel: int = 1
    tensor_parallel: int = 1
    context_parallel: int = 1
    pipeline_parallel: int = 1
    fsdp_shard: int = 1
    dp_replicate: int = 1
    mesh: dict[str, int] = field(default_factory=dict)
    batch_group: tuple[int, ...] = (0,)

    @property
    def sharding(self) -> str | None:
        """How the data-parallel ranks shard the weights: "fsdp1", "fsdp2", "zero3", or None."""
        return self.engine if self.engine in ("fsdp1", "fsdp2", "zero3") else None

    @property
    def group_id(self) -> int:
        """The data-parallel group of this rank, named by its lowest global rank."""
        return min(self.batch_group)

    def as_config(self) -> dict[str, Any]:
        """The run-config keys (run summary's setup, the W&B config): the degrees, the engine, the mesh."""
        config: dict[str, Any] = {
            "engine": self.engine,
            "data_parallel": self.data_parallel,
            "fsdp_shard": self.fsdp_shard,
            "dp_replicate": self.dp_replicate,
            "tensor_parallel": self.tensor_parallel,
        }
        if self.context_parallel > 1:
            config["context_parallel"] = self.context_parallel
        if self.pipeline_parallel > 1:
            config["pipeline_parallel"] = self.pipeline_parallel
        if self.mesh:
            config["mesh"] = dict(self.mesh)
        return config


def role_of_dimension(name: str | None) -> str:
    """ "tensor", "pipeline", "data" or "context" for a mesh dimension name; "data" when unknown."""
    lowered = (name or "").lower()
    for keys, role in _ROLE_OF_NAME:
        if any(key in lowered for key in keys):
            return role
    return "data"


def detect(model: nn.Module) -> Parallelism:
    """The job's split as ``model`` holds it (any wrapper), on this rank; plain data parallel by default."""
    world, rank = distributed.world_size(), distributed.rank()
    engine = _engine(model)
    degrees: dict[str, int] = {}
    shard, replicate = 1, 1
    batch_group = {rank}
    meshes = list(_meshes(model))
    for mesh, placements in meshes:
        names = mesh.mesh_dim_names or (None,) * mesh.ndim
        for dim, name in enumerate(names):
            role, size = role_of_dimension(name), mesh.size(dim)
            degrees[name or f"dim{dim}"] = size
            if role == "data":
                if _is_shard(placements[dim]):
                    shard = max(shard, size)
                else:
                    replicate = max(replicate, size)
        batch_group |= _ranks_sharing_batch(mesh, names, rank)
    tensor = _degree(degrees, "tensor")
    splitting = tensor_parallel_degree(model)
    if tensor == 1 and splitting > 1:  # an unnamed mesh the engine finds splitting matmuls
        tensor = splitting
        if len(meshes) == 1 and meshes[0][0].ndim == 1:
            batch_group |= {int(value) for value in meshes[0][0].mesh.flatten().tolist()}
    context, pipeline = _degree(degrees, "context"), _degree(degrees, "pipeline")
    if engine == "fsdp1":
        shard = max(shard, _fsdp1_shard_size(model))
    data_parallel = max(1, world // (tensor * context * pipeline))
    if engine in ("fsdp1", "fsdp2", "ddp") or shard > 1:
        replicate = max(1, data_parallel // shard)
    return Parallelism(
        world_size=world,
        engine=engine,
        data_parallel=data_parallel,
        tensor_parallel=tensor,
        context_parallel=context,
        pipeline_parallel=pipeline,
        fsdp_shard=shard,
        dp_replicate=replicate,
        mesh=degrees,
        batch_group=tuple(sorted(batch_group)),
    )


def _degree(degrees: dict[str, int], role: str) -> int:
    """The product of the sizes of the dimensions of one role (one dimension each, in practice)."""
    product = 1
    for name, size in degrees.items():
        if role_of_dimension(name) == role:
            product *= size
    return product


def _meshes(model: nn.Module) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Each distinct device mesh of the model's DTensor parameters, with the placements on it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return
    seen: set[int] = set()
    for parameter in model.parameters():
        if isinstance(parameter, DTensor) and id(parameter.device_mesh) not in seen:
            seen.add(id(parameter.device_mesh))
            yield parameter.device_mesh, tuple(parameter.placements)


def _is_shard(placement: Any) -> bool:
    return bool(getattr(placement, "is_shard", lambda: False)())


def _ranks_sharing_batch(mesh: Any, names: tuple[str | None, ...], rank: int) -> set[int]:
    """Global ranks of ``mesh`` at this rank's coordinates in the data-parallel dimensions."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        return set()
    ranks: torch.Tensor = mesh.mesh
    index = tuple(
        slice(None) if role_of_dimension(name) in _MODEL_PARALLEL_ROLES else coordinate[dim]
        for dim, name in enumerate(names)
    )
    return {int(value) for value in ranks[index].flatten().tolist()}


def _engine(model: nn.Module) -> str:
    """The data-parallel wrapper found in the model, outermost first (a compiled model's original
    module is one of its submodules)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for module in model.modules():
        if isinstance(module, FSDPModule):
            return "fsdp2"
        if isinstance(module, FullyShardedDataParallel):
            return "fsdp1"
        if isinstance(module, DistributedDataParallel):
            return "ddp"
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return "zero3"  # DeepSpeed partitions the parameters themselves
    return "none"


def _fsdp1_shard_size(model: nn.Module) -> int:
    """Ranks an FSDP1 wrapper shards over: its process group's size, 1 under NO_SHARD."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            if module.sharding_strategy == ShardingStrategy.NO_SHARD:
                return 1
            group = getattr(module, "process_group", None)
            return group.size() if group is not None else distributed.world_size()
    return 1
