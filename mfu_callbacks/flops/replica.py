"""A meta-device copy of the model's structure, cheap to run, with repeated layers folded.

The copy shares no tensors with the model (parameters, buffers and tensors held as plain attributes
become meta tensors of the same logical shape, dtype and ``requires_grad``), keeps only the hooks of
the model libraries (PEFT's and transformers' ``enable_input_require_grads``, output recording) and
drops every other: the user's own hooks and those of distributed wrappers (FSDP all-gathers,
Accelerate device hooks). A run of identical blocks in a ``ModuleList`` keeps one representative
per distinct kind, standing for all of them: a 70B model traces as two layers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from .._torch_internals import (
    COMPOSABLE_STATE_KEY_PREFIX,
    FORWARD_HOOK_DICTS,
    OTHER_HOOK_DICTS,
    module_hook_dicts,
)
from .isolation import map_tensors
from .windows import window_of

# Hooks from these packages move data between devices or ranks (or measure, like ours); on a replica they must not run.
# Hooks of the model libraries change autograd or record outputs: they run on the copy. No other hook does.
_MODEL_HOOK_PACKAGES = ("transformers", "peft")
_FOREIGN_HOOK_PACKAGES = (
    "torch.distributed",
    "accelerate",
    "deepspeed",
    "lightning",
    "pytorch_lightning",
    "mfu_callbacks",
)
# A LightningModule's references back to the training machinery (Trainer, Fabric, device mesh):
# never copied. tests/test_framework_boundary.py checks that Lightning still names them so.
_BACK_REFERENCES = ("_trainer", "_fabric", "_device_mesh")
# Attributes that differ between otherwise identical layers without changing their FLOPs.
_POSITION_ATTRIBUTES = ("idx", "index", "layer_id", "layer_number", "block_id", "layer_num")
_MIN_RUN_TO_FOLD = 3


@dataclass
class Replica:
    module: nn.Module
    names: dict[int, str]  # id(replica submodule) -> its path in the user's model
    multiplicity: dict[int, int]  # id(replica block) -> how many identical blocks it stands for
    parameter_ids: set[int]
    folded: list[str] = field(default_factory=list)


def logical_shape(tensor: torch.Tensor) -> torch.Size:
    """The full shape of a possibly sharded parameter (DeepSpeed ZeRO-3 keeps it in ``ds_shape``)."""
    ds_shape = getattr(tensor, "ds_shape", None)
    return torch.Size(ds_shape) if ds_shape is not None else tensor.shape


def _to_meta(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
    meta = torch.empty(logical_shape(tensor), dtype=tensor.dtype, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if parameter else meta


def _block_signature(block: nn.Module) -> tuple:
    """Everything about a block that can change its FLOPs, and nothing that only names its position."""
    modules = tuple((name, type(m).__name__, m.training) for name, m in block.named_modules())
    parameters = tuple(
        (n, tuple(logical_shape(p)), p.dtype, p.requires_grad) for n, p in block.named_parameters()
    )
    scalars = tuple(
        (name, key, value)
        for name, m in block.named_modules()
        for key, value in sorted(vars(m).items())
        if isinstance(value, (bool, int, float, str)) and not any(pos in key for pos in _POSITION_ATTRIBUTES)
    )
    windows = tuple(window_of(m) for m in block.modules())  # a local layer never stands for a global one
    return (type(block), modules, parameters, scalars, windows)


def _fold_plan(model: nn.Module) -> tuple[dict[int, list[int]], dict[int, int]]:
    """For each long homogeneous block list: the indices to keep, and each kept block's multiplicity."""
    keep: dict[int, list[int]] = {}
    multiplicity: dict[int, int] = {}
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < _MIN_RUN_TO_FOLD:
            continue
        blocks = list(container)
        if len({type(b) for b in blocks}) != 1 or not any(True for _ in blocks[0].parameters()):
            continue
        representatives: dict[tuple, int] = {}
        upstream_trains = False
        kept: list[int] = []
        for index, block in enumerate(blocks):
            # Block 0 always stands alone: whether its input needs a gradient depends on what precedes the list.
            key = ("first",) if index == 0 else (_block_signature(block), upstream_trains)
            if key in representatives:
                multiplicity[id(blocks[representatives[key]])] += 1
            else:
                representatives[key] = index
                multiplicity[id(block)] = 1
                kept.append(index)
            upstream_trains |= any(p.requires_grad for p in block.parameters())
        if len(kept) < len(blocks):
            keep[id(container)] = kept
    return keep, multiplicity


def _filtered_hooks(hooks: dict) -> OrderedDict:
    """Only the hooks of the model libraries, which shape the computation (PEFT's and transformers'
    ``enable_input_require_grads``, output recording): a user's hooks never run on the copy, where they
    would see meta tensors and could change what the run counts or does."""
    return OrderedDict(
        (key, hook) for key, hook in hooks.items() if _hook_package(hook).startswith(_MODEL_HOOK_PACKAGES)
    )


def _hook_package(hook: object) -> str:
    owner = getattr(hook, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(hook, "__module__", None)
    return module or ""


def _plain_tensors_to_meta(module: nn.Module, memo: dict[int, object]) -> None:
    """Tensors a module holds as plain attributes (caches, tables; not parameters or buffers) are
    copied as meta tensors, nested in lists and dicts too: the copy never allocates real memory."""
    for value in module.__dict__.values():
        if isinstance(value, (torch.Tensor, list, tuple, dict)):
            map_tensors(
                value, lambda _, tensor: memo.setdefault(id(tensor), _to_meta(tensor, parameter=False))
            )


def _refuses_deepcopy(module: nn.Module) -> bool:
    """FSDP2's ``fully_shard`` (and composable ``replicate``) swap in a class whose ``__deepcopy__`` raises."""
    deepcopy = getattr(type(module), "__deepcopy__", None)
    return deepcopy is not None and getattr(deepcopy, "__module__", "").startswith(_FOREIGN_HOOK_PACKAGES)


def _copy_as_plain_module(module: nn.Module, memo: dict[int, object]) -> None:
    """Copy a module of such a class as the user's own class (the first base the wrapper did not add)."""
    plain: type[nn.Module] = next(
        c for c in type(module).__mro__[1:] if not c.__module__.startswith(_FOREIGN_HOOK_PACKAGES)
    )
    copied = plain.__new__(plain)
    memo[id(module)] = copied
    # The wrapper's own state (process groups, sharding plans) lives under composable-API keys: not copied.
    state = {k: v for k, v in module.__dict__.items() if not k.startswith(COMPOSABLE_STATE_KEY_PREFIX)}
    copied.__dict__.update(copy.deepcopy(state, memo))


def build_replica(model: nn.Module, *, fold: bool = True) -> Replica:
    """Copy ``model``'s structure onto the meta device without touching its data."""
    keep, multiplicity = _fold_plan(model) if fold else ({}, {})
    placeholder = nn.Module()
    memo: dict[int, object] = {}
    dropped: set[int] = set()
    for container in model.modules():
        if id(container) in keep and isinstance(
            container, (nn.ModuleList, nn.Sequential)
        ):  # as _fold_plan chose them
            kept = set(keep[id(container)])
            for index, block in enumerate(container):
                if index not in kept:
                    memo[id(block)] = placeholder
                    dropped.add(id(block))
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            memo.setdefault(id(parameter), _to_meta(parameter, parameter=True))
        for buffer in module.buffers(recurse=False):
            memo.setdefault(id(buffer), _to_meta(buffer, parameter=False))
        _plain_tensors_to_meta(module, memo)
        for hooks in module_hook_dicts(module, FORWARD_HOOK_DICTS):
            memo[id(hooks)] = _filtered_hooks(hooks)
        for hooks in module_hook_dicts(module, OTHER_HOOK_DICTS):
            memo[id(hooks)] = OrderedDict()
        for attribute in _BACK_REFERENCES:
            value = module.__dict__.get(attribute)
            if value is not None:
                memo[id(value)] = None
    for module in reversed(list(model.modules())):  # descendants before their ancestors
        if id(module) not in memo and _refuses_deepcopy(module):
            _copy_as_plain_module(module, memo)
    replica = copy.deepcopy(model, memo)

    for container_id in keep:
        copied = memo[container_id]
        assert isinstance(copied, (nn.ModuleList, nn.Sequential))  # the copy of a list _fold_plan chose
        for index in reversed(range(len(copied))):  # deleting renumbers the blocks that follow
            if copied[index] is placeholder:
                del copied[index]

    names: dict[int, str] = {}
    folded_multiplicity: dict[int, int] = {}
    for name, original in model.named_modules(remove_duplicate=False):
        if id(original) in dropped or id(original) not in memo:
            continue
        copied = model if original is model else memo[id(original)]
        copied = replica if original is model else copied
        names.setdefault(id(copied), name)
        if id(original) in multiplicity and multiplicity[id(original)] > 1:
            folded_multiplicity[id(copied)] = multiplicity[id(original)]
    folded = [f"{names[i]} x{n}" for i, n in folded_multiplicity.items()]
    parameter_ids = {id(p) for p in replica.parameters()}
    return Replica(replica, names, folded_multiplicity, parameter_ids, folded)
