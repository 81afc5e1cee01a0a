"""A meta-device copy of the model's structure, cheap to run, with repeated layers folded.

The copy shares no tensors with the model and copies none: every tensor it reaches (parameters,
buffers, attributes, inside any object at any depth; views, non-leaf tensors, DTensors, FSDP's flat
parameters) becomes a meta tensor of the same whole shape and dtype, a parameter keeping its
``requires_grad``; FSDP1 units become the modules they wrap, their parameters unflattened. The
whole shape is what a rank multiplies with under data-parallel sharding; the part of a weight it
multiplies with under tensor parallel is kept apart, in ``Replica.shards`` (``sharding.py``). It keeps
only the hooks of the model libraries (PEFT's and transformers' ``enable_input_require_grads``,
output recording) and drops every other: the user's own hooks and those of distributed wrappers
(FSDP all-gathers, Accelerate device hooks). A run of identical blocks in a ``ModuleList`` keeps one
representative per distinct kind, standing for all of them: a 70B model traces as two layers.
Methods replaced on an instance (``module.forward = ...``) run on the copy's own module, or the
copy is refused by the attribute's name.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import inspect
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..._torch_internals import (
    COMPOSABLE_STATE_KEY_PREFIX,
    FORWARD_HOOK_DICTS,
    OTHER_HOOK_DICTS,
    FlattenedParameter,
    fsdp1_flattened_parameters,
    fsdp1_inner_module,
    module_hook_dicts,
)
from ..counting.attention_windows import attention_window_of
from ..declared import Declaration, declared
from ..sharding import ComputeShapes, Shard, full_shape
from ..unwrap import unwrap_model

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
# What copy.deepcopy shares instead of copying (or cannot copy: modules): never searched for tensors.
_SHARED = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    weakref.ref,
    property,
    str,
    bytes,
    int,
    float,
    complex,
    range,
)


class ReplicaError(RuntimeError):
    """The model cannot be copied so that the copy runs on its own tensors."""


@dataclass
class Replica:
    module: nn.Module
    names: dict[int, str]  # id(replica submodule) -> its path in the user's model
    multiplicity: dict[int, int]  # id(replica block) -> how many identical blocks it stands for
    parameter_ids: set[int]
    folded: list[str] = field(default_factory=list)
    declarations: dict[int, Declaration] = field(default_factory=dict)  # id(replica submodule) -> its FLOPs
    # id(replica parameter) -> the part of it this rank multiplies with (tensor parallel, ``sharding.py``)
    shards: dict[int, Shard] = field(default_factory=dict)
    # ids of replica parameters that require a gradient only as FSDP1's flat parameter does (frozen ones)
    frozen: set[int] = field(default_factory=set)
    # id(replica parameter) -> ranks that run its matmuls whole on the same batch (a replicated weight
    # under tensor parallel, ``sharding.py``); absent: 1
    copies: dict[int, int] = field(default_factory=dict)

    def parameter_owners(self) -> dict[int, tuple[str, ...]]:
        """id(replica parameter) -> the paths of the modules holding it (two for tied weights)."""
        owners: dict[int, tuple[str, ...]] = {}
        for module in self.module.modules():
            path = self.names.get(id(module), "")
            for parameter in module.parameters(recurse=False):
                owners[id(parameter)] = (*owners.get(id(parameter), ()), path)
        return owners


def _to_meta(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
    meta = torch.empty(full_shape(tensor), dtype=tensor.dtype, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if parameter else meta


def _tensors_to_meta(root: object, memo: dict[int, object]) -> None:
    """Put a meta tensor into the memo for every tensor reachable from ``root`` through attributes,
    containers and slots (what copy.deepcopy copies), past objects the memo already settles: the copy
    then never meets a real tensor. Tensors of any subclass, views and non-leaf tensors included."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        value = stack.pop()
        if id(value) in seen or id(value) in memo or isinstance(value, _SHARED):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            # A tensor with no single shape (nested, a lazy module's uninitialized parameter) is left
            # to its own __deepcopy__, as before.
            with contextlib.suppress(RuntimeError):
                memo[id(value)] = _to_meta(value, parameter=isinstance(value, nn.Parameter))
        else:
            stack.extend(gc.get_referents(value))


def _block_signature(block: nn.Module, shapes: ComputeShapes) -> tuple:
    """Everything about a block that can change its FLOPs, and nothing that only names its position."""
    modules = tuple((name, type(m).__name__, m.training, declared(m)) for name, m in block.named_modules())
    parameters = tuple(
        (n, tuple(full_shape(p)), shapes.shard(p), p.dtype, p.requires_grad)
        for n, p in block.named_parameters()
    )
    scalars = tuple(
        (name, key, value)
        for name, m in block.named_modules()
        for key, value in sorted(vars(m).items())
        if isinstance(value, (bool, int, float, str)) and not any(pos in key for pos in _POSITION_ATTRIBUTES)
    )
    windows = tuple(
        attention_window_of(m) for m in block.modules()
    )  # a local layer never stands for a global one
    return (type(block), modules, parameters, scalars, windows)


def _fold_plan(model: nn.Module, shapes: ComputeShapes) -> tuple[dict[int, list[int]], dict[int, int]]:
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
            key = ("first",) if index == 0 else (_block_signature(block, shapes), upstream_trains)
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
    return OrderedDict((key, hook) for key, hook in hooks.items() if is_model_library_hook(hook))


def is_model_library_hook(hook: object) -> bool:
    """Whether a hook belongs to a model library (transformers, PEFT): the only hooks that run on the copy."""
    return _hook_package(hook).startswith(_MODEL_HOOK_PACKAGES)


def _hook_package(hook: object) -> str:
    owner = getattr(hook, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(hook, "__module__", None)
    return module or ""


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


def _unflatten(parameters: list[FlattenedParameter], memo: dict[int, object]) -> set[int]:
    """Give each copied module back the parameters FSDP1 flattened, unsharded, tied as they were.

    A frozen parameter in a unit with trainable ones requires a gradient in the step (its view of the
    flat parameter does): it does on the copy too, and its id is returned, so that its weight
    gradient counts as hardware FLOPs only."""
    restored: dict[tuple[int, str], nn.Parameter] = {}
    frozen: set[int] = set()
    for p in parameters:
        copied = memo.get(id(p.module))
        if not isinstance(copied, nn.Module):  # in a block that folding dropped
            continue
        if p.tied_to is not None:
            parameter = restored[(id(p.tied_to[0]), p.tied_to[1])]
        else:
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            parameter = nn.Parameter(meta, requires_grad=p.requires_grad or p.view_requires_grad)
            if parameter.requires_grad and not p.requires_grad:
                frozen.add(id(parameter))
        restored[(id(p.module), p.name)] = parameter
        copied.__dict__.pop(p.name, None)  # a plain view (use_orig_params=False)
        copied.register_parameter(p.name, parameter)
    return frozen


def _rebind_patched_methods(model: nn.Module, memo: dict[int, object]) -> None:
    """Methods replaced on an instance (``module.forward = ...``) run on the copy's own module.

    A bound method is rebound by the copy itself. A wrapper around one (``torch.compile``'s, as
    Lightning puts on ``forward`` and ``training_step`` of a compiled LightningModule; FSDP2's around
    ``generate``, as the HF Trainer registers it) is unwrapped to that method, rebound: the same code, uncompiled, whose FLOPs are the same. A function that
    holds a module of the model any other way (a closure) would run on the real tensors: refused.
    """
    originals = {id(module) for module in model.modules()}
    for path, module in model.named_modules():
        copied = memo.get(id(module))
        if not isinstance(copied, nn.Module):
            continue
        for attribute, value in vars(module).items():
            if (
                not callable(value)
                or isinstance(value, nn.Module)
                or not callable(getattr(type(module), attribute, None))
            ):
                continue
            # Down to the first method bound to a module under the value: FSDP2's
            # register_fsdp_forward_method binds a wrapper around the module's own bound method.
            method = inspect.unwrap(value, stop=functools.partial(_bound_below, value))
            owner = getattr(method, "__self__", None)
            if isinstance(owner, nn.Module) and id(owner) in originals:
                setattr(copied, attribute, types.MethodType(method.__func__, memo[id(owner)]))
            elif _holds_module(value, originals):
                name = f"{path}.{attribute}" if path else attribute
                raise ReplicaError(
                    f"{type(module).__name__}.{attribute} ('{name}') was replaced on the instance by a function that "
                    "holds the model itself (a closure): on the meta-device copy it would run the real model on its "
                    "real tensors"
                )


def _bound_below(top: object, function: object) -> bool:
    """Whether ``function``, found under ``top`` while unwrapping it, is a method bound to a module."""
    return function is not top and isinstance(getattr(function, "__self__", None), nn.Module)


def _holds_module(function: object, originals: set[int]) -> bool:
    """Whether a function reaches one of the model's modules through its closure or partial arguments."""
    seen: set[int] = set()
    stack = [function]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, nn.Module):
            if id(value) in originals:
                return True
            continue
        if isinstance(value, functools.partial):
            stack.extend([value.func, *value.args, *value.keywords.values()])
        elif isinstance(value, types.MethodType):
            stack.extend([value.__func__, value.__self__])
        elif isinstance(value, types.FunctionType):
            stack.extend(_cell_contents(cell) for cell in value.__closure__ or ())
            wrapped = getattr(value, "__wrapped__", None)
            if wrapped is not None:
                stack.append(wrapped)
    return False


def _cell_contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return None


def build_replica(model: nn.Module, *, fold: bool = True) -> Replica:
    """Copy ``model``'s structure (inside its wrappers) onto the meta device without touching its data.

    Over 60 lines because its steps share one deepcopy memo, in an order that matters: the folded
    layers' placeholders, hooks and back references set first, then the copy, then names,
    declarations, multiplicities and shards read through the memo from the originals to the copies.
    """
    flattened = [p for unit in model.modules() for p in fsdp1_flattened_parameters(unit)]
    model = unwrap_model(model)
    shapes = ComputeShapes(model)
    keep, multiplicity = _fold_plan(model, shapes) if fold else ({}, {})
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
        for hooks in module_hook_dicts(module, FORWARD_HOOK_DICTS):
            memo[id(hooks)] = _filtered_hooks(hooks)
        for hooks in module_hook_dicts(module, OTHER_HOOK_DICTS):
            memo[id(hooks)] = OrderedDict()
        for attribute in _BACK_REFERENCES:
            value = module.__dict__.get(attribute)
            if value is not None:
                memo[id(value)] = None
    _tensors_to_meta(model, memo)
    for module in reversed(list(model.modules())):  # descendants before their ancestors
        if id(module) in memo:
            continue
        inner = fsdp1_inner_module(module)
        if inner is not None:  # the unit's own state (process group, flat parameter) is not copied
            memo[id(module)] = copy.deepcopy(inner, memo)
        elif _refuses_deepcopy(module):
            _copy_as_plain_module(module, memo)
    replica = copy.deepcopy(model, memo)
    frozen = _unflatten(flattened, memo)
    _rebind_patched_methods(model, memo)

    for container_id in keep:
        copied = memo[container_id]
        assert isinstance(copied, (nn.ModuleList, nn.Sequential))  # the copy of a list _fold_plan chose
        for index in reversed(range(len(copied))):  # deleting renumbers the blocks that follow
            if copied[index] is placeholder:
                del copied[index]

    names: dict[int, str] = {}
    folded_multiplicity: dict[int, int] = {}
    declarations: dict[int, Declaration] = {}
    for name, original in model.named_modules(remove_duplicate=False):
        if id(original) in dropped or id(original) not in memo:
            continue
        copied = model if original is model else memo[id(original)]
        copied = replica if original is model else copied
        names.setdefault(id(copied), name)
        declaration = declared(original)  # an instance declaration names the user's module, not its copy
        if declaration is None and isinstance(copied, nn.Module):
            declaration = declared(copied)  # copied as its plain class (FSDP2's wrapper class dropped)
        if declaration is not None:
            declarations[id(copied)] = declaration
        if id(original) in multiplicity and multiplicity[id(original)] > 1:
            folded_multiplicity[id(copied)] = multiplicity[id(original)]
    folded = [f"{names[i]} x{n}" for i, n in folded_multiplicity.items()]
    parameter_ids = {id(p) for p in replica.parameters()}
    shards = {
        id(memo[id(p)]): shard
        for p in model.parameters()
        if id(memo.get(id(p))) in parameter_ids and (shard := shapes.shard(p)) is not None
    }
    # Under tensor parallel every weight left whole runs alike on each rank of the group.
    degree = shapes.tensor_parallel(model.parameters())
    copies = {
        id(memo[id(p)]): degree
        for p in model.parameters()
        if degree > 1 and id(memo.get(id(p))) in parameter_ids and id(memo[id(p)]) not in shards
    }
    return Replica(
        replica, names, folded_multiplicity, parameter_ids, folded, declarations, shards, frozen, copies
    )
