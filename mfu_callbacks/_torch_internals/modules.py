"""What a module keeps where torch has no API to read it: its hook dictionaries (per module and for every
module at once), a call's keyword arguments, and the module or parameters inside a distributed or
compiled wrapper (FSDP1, FSDP2, composable APIs, ``torch.compile``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

# -- modules ---------------------------------------------------------------------------------------
# The per-module hook dictionaries (torch has APIs to add hooks, none to list them). Forward hooks
# are copied to a replica minus those of distributed wrappers; the others never run on it.
FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
OTHER_HOOK_DICTS = (
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def module_hook_dicts(module: nn.Module, names: tuple[str, ...]) -> Iterator[dict]:
    """The non-empty hook dictionaries ``names`` of ``module``."""
    for name in names:
        hooks = getattr(module, name, None)
        if hooks:
            yield hooks


# Hooks registered for every module at once (torch.nn.modules.module.register_module_forward_hook
# and its siblings) live in module-level dictionaries that every module call reads. The
# with_kwargs / always_call flags sit in side dictionaries keyed by the same handle ids, and only
# matter for a hook that is still in its main dictionary.
_GLOBAL_HOOK_DICTS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def global_module_hooks() -> Iterator[dict]:
    """The dictionaries of the hooks that torch runs for every module."""
    for name in _GLOBAL_HOOK_DICTS:
        yield getattr(nn.modules.module, name)


@contextmanager
def global_module_hooks_limited_to(keep: Callable[[Any], bool]) -> Iterator[None]:
    """While active, the hooks torch runs for every module are only those ``keep`` accepts; all of them are
    back, in their order, afterwards. For every thread: hold it only around the replica's probe forwards."""
    saved = [(hooks, dict(hooks)) for hooks in global_module_hooks()]
    for hooks, original in saved:
        for key, hook in original.items():
            if not keep(hook):
                del hooks[key]
    try:
        yield
    finally:
        for hooks, original in saved:
            hooks.clear()
            hooks.update(original)


_CALL_IMPL = "_call_impl"  # the body of Module.__call__: its frame holds the call's ``kwargs``


def call_keywords(module: nn.Module) -> dict[str, Any] | None:
    """The keyword arguments of the call of ``module`` whose forward pre-hooks run now: a hook torch runs
    for every module is handed the positional ones only. None where no such call is on this stack."""
    frame = inspect.currentframe()
    for _ in range(8):  # the hook, a wrapper or two around it, then the call
        if frame is None:
            return None
        if frame.f_code.co_name == _CALL_IMPL and frame.f_locals.get("self") is module:
            kwargs = frame.f_locals.get("kwargs")
            return kwargs if isinstance(kwargs, dict) else None
        frame = frame.f_back
    return None


# Composable distributed APIs (fully_shard, replicate) keep their state in a module's __dict__
# under keys that start with this (torch.distributed._composable.contract.generate_state_key).
COMPOSABLE_STATE_KEY_PREFIX = "__composable_api_state_key"

# FSDP1's FullyShardedDataParallel keeps the module it wraps under this attribute, and in its handle
# one FlatParameter for the parameters of that module's subtree: each original's owning module, name
# and unsharded shape (``_param_infos``, ``_shapes``) and the ties (``_shared_param_infos``). Between
# steps the owning modules hold sharded views of it (use_orig_params=True: 1-D parameters) or plain
# non-leaf views, or nothing (use_orig_params=False).
FSDP1_WRAPPER = "FullyShardedDataParallel"
_FSDP1_INNER = "_fsdp_wrapped_module"


@dataclass(frozen=True)
class FlattenedParameter:
    """One parameter that an FSDP1 unit flattened, as the module it belongs to declared it."""

    module: nn.Module
    name: str
    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool
    tied_to: tuple[nn.Module, str] | None  # the module and name of the parameter it is, if tied
    # Whether its unsharded view requires a gradient in the step: the flat parameter's, true where any
    # parameter of the unit trains (use_orig_params=True), so a frozen one's weight gradient runs too.
    view_requires_grad: bool = False


def fsdp1_inner_module(module: nn.Module) -> nn.Module | None:
    """The module an FSDP1 unit wraps; None for any other module."""
    inner = getattr(module, _FSDP1_INNER, None) if type(module).__name__ == FSDP1_WRAPPER else None
    return inner if isinstance(inner, nn.Module) else None


def fsdp1_flattened_parameters(unit: nn.Module) -> list[FlattenedParameter]:
    """The parameters an FSDP1 unit flattened, ties last (each after the parameter it is tied to); none
    for any other module."""
    handle = getattr(unit, "_handle", None) if fsdp1_inner_module(unit) is not None else None
    flat = getattr(handle, "flat_param", None)
    if flat is None:
        return []
    own = [
        FlattenedParameter(
            info.module,
            info.param_name,
            torch.Size(shape),
            flat.dtype,
            getattr(getattr(info.module, info.param_name, None), "requires_grad", flat.requires_grad),
            None,
            flat.requires_grad,
        )
        for info, shape in zip(flat._param_infos, flat._shapes)
    ]
    by_name = {(id(p.module), p.name): p for p in own}
    tied = [
        replace(
            by_name[(id(info.prim_module), info.prim_param_name)],
            module=info.module,
            name=info.param_name,
            tied_to=(info.prim_module, info.prim_param_name),
        )
        for info in flat._shared_param_infos
    ]
    return own + tied


# FSDP2 (``fully_shard``) keeps, per module it was applied to, a state (``_get_fsdp_state()``) whose
# parameter groups hold one FSDPParam per managed parameter: ``sharded_param`` is the DTensor the
# module holds between steps, ``_unsharded_dtensor_spec`` the tensor-parallel DTensor spec the
# all-gather restores for the forward (None when it restores a plain tensor: FSDP2 alone).
_FSDP2_STATE = "_get_fsdp_state"


def fsdp2_unsharded_specs(module: nn.Module) -> dict[int, Any]:
    """id(sharded parameter) -> the DTensor spec it computes with after FSDP2's all-gather (None: a
    plain full tensor), for the parameters FSDP2 manages at ``module``; empty for any other module."""
    get_state = getattr(module, _FSDP2_STATE, None)
    if not callable(get_state):
        return {}
    state = get_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older torch: at most one group
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return {
        # Older torch named the spec ``_tp_spec``.
        id(fsdp_param.sharded_param): getattr(
            fsdp_param, "_unsharded_dtensor_spec", getattr(fsdp_param, "_tp_spec", None)
        )
        for group in groups
        for fsdp_param in group.fsdp_params
    }


# torch.compile's wrapper (torch._dynamo.eval_frame.OptimizedModule) and where it keeps the model.
COMPILED_WRAPPER = "OptimizedModule"
COMPILED_ORIGINAL = "_orig_mod"
# Module.compile() compiles in place and keeps the compiled call here.
COMPILED_IN_PLACE = "_compiled_call_impl"
