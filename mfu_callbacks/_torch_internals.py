"""Every private torch name that mfu-callbacks uses, in this one module.

The FLOP engine runs a meta-device copy of the model under a dispatch mode and needs a few things
torch has no public API for: the dispatch mode class itself, the names of internal aten kernels,
a way to route activation checkpointing to its recorder, the dictionaries in which a module keeps
its hooks (per module and for every module at once), the keyword arguments of a module call (a hook
for every module is not handed them), the module inside a ``torch.compile`` wrapper, the tensors a tensor subclass wraps, a way to run ``flex_attention`` on meta tensors, and
(one patch of a public name) an autocast that accepts the meta device. Each is named here with what it is for;
``tests/test_torch_internals.py`` checks that every one still exists in the installed torch, so an
upgrade that renames one fails that test (the callbacks' guard would otherwise reduce the breakage
to one log line), and that no other module of the package reaches for a private torch name.
"""

from __future__ import annotations

import inspect
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils._python_dispatch import (
    TorchDispatchMode,  # noqa: F401 - re-exported: the base of every dispatch mode, FlopCounterMode's too
    _get_current_dispatch_mode_stack,
    _pop_mode,
    is_traceable_wrapper_subclass,
)

_aten = torch.ops.aten

# -- aten kernels ----------------------------------------------------------------------------------
READ_SCALAR = (
    _aten._local_scalar_dense.default
)  # a value read back to Python: .item(), bool(tensor), `x in tensor`
# Operations, by name, that wait for the device to read a value back to the host.
SYNCING_OPERATIONS = frozenset(
    {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.scalar_tensor"}
)
# The reduction behind torch._check_tensor_all (transformers' ``torch_compilable_check``): an assertion
# about the data, e.g. that a VLM's image tokens match its image features, whose value is then read.
ASSERTION = _aten._is_all_true.default
CONVOLUTION_KERNEL = (
    _aten._convolution.default
)  # the kernel behind aten.convolution; same first nine arguments
# Matmul kernels a real step may run besides mm/bmm (MoE grouped GEMMs, fp8): their packets.
EXTRA_MATMULS = tuple(
    getattr(_aten, name)
    for name in ("_grouped_mm", "_scaled_mm", "_scaled_grouped_mm")
    if hasattr(_aten, name)
)
# Fused attention kernels (query, key, value first). On the meta device SDPA decomposes into bmm
# today; these count it should a fused kernel be dispatched instead.
FUSED_ATTENTION_NAMES = (
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
)


def _overloads(names: tuple[str, ...]) -> frozenset:
    return frozenset(
        getattr(packet, overload)
        for packet in (getattr(_aten, name) for name in names if hasattr(_aten, name))
        for overload in packet.overloads()
    )


FUSED_ATTENTION = _overloads(FUSED_ATTENTION_NAMES)
# What a real step may run besides: the kernels under SDPA on CUDA, called directly by some models
# (layout [batch, length, heads, dim], or [tokens, heads, dim] for variable lengths), and every
# attention backward kernel (grad_output first, then query, key, value).
ATTENTION_KERNEL_NAMES = ("_flash_attention_forward", "_efficient_attention_forward")
ATTENTION_BACKWARD_NAMES = (
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_backward",
    "_efficient_attention_backward",
)
ATTENTION_FORWARD = FUSED_ATTENTION | _overloads(ATTENTION_KERNEL_NAMES)
ATTENTION_BACKWARD = _overloads(ATTENTION_BACKWARD_NAMES)
HEADS_SECOND_TO_LAST = _overloads(ATTENTION_KERNEL_NAMES + ATTENTION_BACKWARD_NAMES[4:])


def wrapped_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a wrapper subclass holds (torchao's ``Float8TrainingTensor``: its fp8 data and scale),
    by the subclass protocol ``__tensor_flatten__``; none for a plain tensor. A dispatch mode sees ops on
    the wrapper, never the ops that made it: what it knows of the data holds for the wrapper."""
    if (
        type(tensor) is torch.Tensor
        or type(tensor) is nn.Parameter
        or not is_traceable_wrapper_subclass(tensor)
    ):
        return []
    names, _ = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name, None) for name in names)
    return [t for t in inner if isinstance(t, torch.Tensor)]


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken of (a weight's transpose inside ``F.linear`` is a view of the weight)."""
    return tensor._base if tensor._base is not None else tensor


# -- the dispatch mode stack -----------------------------------------------------------------------
# The real-step observer stays on torch's mode stack across the user's code (the forward and the
# backward it watches), so it must be able to check that it is gone however the step ended.


def dispatch_mode_stack() -> list[TorchDispatchMode]:
    """The dispatch modes active in this thread, innermost last."""
    return _get_current_dispatch_mode_stack()


def leave_dispatch_mode(mode: TorchDispatchMode) -> bool:
    """Take ``mode`` off this thread's stack if it is the innermost mode there; whether it was.

    Normally its own ``__exit__``; a mode that reappeared after that (the autograd engine restores the
    thread state it saved when a backward began) is popped without it.
    """
    stack = _get_current_dispatch_mode_stack()
    if not stack or stack[-1] is not mode:
        return False
    if mode.old_dispatch_mode_flags:  # entered and not yet left: torch's own bookkeeping goes with it
        TorchDispatchMode.__exit__(mode, None, None, None)  # the base's: a subclass's may lead back here
    else:
        _pop_mode()
    return True


# -- the autograd engine ----------------------------------------------------------------------------


def current_autograd_node() -> Any:
    """The autograd node whose backward is running in this thread; None outside a backward."""
    return torch._C._current_autograd_node()


def custom_function_forward() -> int | None:
    """The sequence number of the custom ``autograd.Function`` whose forward is running in this thread,
    or None outside one (grad mode on, or off by ``no_grad``/``inference_mode``).

    ``Function.apply`` turns off both grad modes (backward and forward-mode AD) around ``forward`` and
    creates the Function's autograd node just before it: no other node is made while it runs, so the
    node's sequence number is the thread's last one. ``no_grad`` leaves forward-mode AD on, and
    ``inference_mode`` is said by its own flag.
    """
    if torch.is_grad_enabled() or torch._C._is_fwd_grad_enabled() or torch.is_inference_mode_enabled():
        return None
    return torch._C._autograd._get_sequence_nr() - 1


def node_sequence_number(node: Any) -> int | None:
    """The sequence number of an autograd node (that of the forward op that made it)."""
    sequence_nr = getattr(node, "_sequence_nr", None)
    return sequence_nr() if sequence_nr is not None else None


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the backward now running ends (call it from inside that backward)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


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


# -- activation checkpointing ----------------------------------------------------------------------
# Every caller of torch.utils.checkpoint.checkpoint (transformers holds it in a functools.partial,
# FSDP's CheckpointWrapper too) ends in one of two module-level names that checkpoint() looks up
# when it runs: CheckpointFunction (reentrant) and _checkpoint_without_reentrant_generator.
def profiler_running() -> bool:
    """Whether a torch profiler (autograd's or kineto's) is already collecting in this process."""
    return bool(torch.autograd.profiler._is_profiler_enabled or torch._C._autograd._profiler_enabled())


_REENTRANT = "CheckpointFunction"
_NON_REENTRANT = "_checkpoint_without_reentrant_generator"
# set_checkpoint_early_stop (public) sets this; when not None it overrides the early_stop argument.
_EARLY_STOP_OVERRIDE = "_enable_checkpoint_early_stop"

# region(early_stop) -> context manager around a non-reentrant region's forward
NonReentrantRegion = Callable[[bool], Any]


@contextmanager
def checkpoint_routed_to(
    reentrant: Callable[..., Any], non_reentrant_region: NonReentrantRegion
) -> Iterator[None]:
    """While active, ``checkpoint(function, *args)`` runs ``reentrant(function, *args)`` for
    ``use_reentrant=True``, and ``function`` inside ``non_reentrant_region(early_stop)`` otherwise
    (torch's own choice between the two variants is left as it is)."""

    class Reentrant:
        @staticmethod
        def apply(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
            return reentrant(function, *args)

    original_generator = getattr(torch_checkpoint, _NON_REENTRANT)
    parameters = inspect.signature(original_generator)  # early_stop is a parameter since torch 2.6

    def generator(function: Callable, *args: Any, **kwargs: Any) -> Iterator[None]:
        early_stop = parameters.bind(function, *args, **kwargs).arguments.get("early_stop", True)
        override = getattr(torch_checkpoint, _EARLY_STOP_OVERRIDE, None)
        with non_reentrant_region(early_stop if override is None else override):
            yield  # checkpoint() runs the region between its two next() calls

    original_function = getattr(torch_checkpoint, _REENTRANT)
    setattr(torch_checkpoint, _REENTRANT, Reentrant)
    setattr(torch_checkpoint, _NON_REENTRANT, generator)
    try:
        yield
    finally:
        setattr(torch_checkpoint, _REENTRANT, original_function)
        setattr(torch_checkpoint, _NON_REENTRANT, original_generator)


# -- flex_attention on the meta device ------------------------------------------------------------
# torch.nn.attention.flex_attention.flex_attention refuses meta tensors (_validate_device) and runs
# its higher-order op through torch.compile (skipped when _FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is
# set). It looks all three names up in its module when it runs, so they can be rerouted there for
# every caller, however the function was imported. The op takes the BlockMask as
# ``BlockMask.as_tuple()``: (q_len, kv_len, kv_num_blocks, kv_indices, full_kv_num_blocks, ...,
# Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod).
_FLEX_MODULE = "torch.nn.attention.flex_attention"
_FLEX_VALIDATE_DEVICE = "_validate_device"
_FLEX_OP = "flex_attention_hop"
_FLEX_NO_COMPILE = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"
FLEX_MASK_LENGTHS = slice(0, 2)
FLEX_MASK_KV_NUM_BLOCKS = 2
FLEX_MASK_FULL_KV_NUM_BLOCKS = 4
FLEX_MASK_BLOCK_SIZES = slice(-3, -1)  # (Q_BLOCK_SIZE, KV_BLOCK_SIZE)
FLEX_MASK_MOD = -1

# kernel(query, key, value, score_mod, block_mask_tuple, scale, kernel_options, ...) -> (out, lse, max_scores)
FlexKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@contextmanager
def flex_attention_on_meta(kernel: FlexKernel) -> Iterator[None]:
    """While active, in this thread, ``flex_attention`` on meta tensors runs ``kernel`` in place of its compiled
    higher-order op; calls on other devices or from other threads run as they do without it."""
    import importlib

    module = importlib.import_module(_FLEX_MODULE)
    validate, op, no_compile = (
        getattr(module, name) for name in (_FLEX_VALIDATE_DEVICE, _FLEX_OP, _FLEX_NO_COMPILE)
    )
    thread = threading.get_ident()

    def on_meta(query: torch.Tensor) -> bool:
        return query.device.type == "meta" and threading.get_ident() == thread

    def validate_device(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if not on_meta(query):
            validate(query, key, value)
            return
        setattr(module, _FLEX_NO_COMPILE, True)  # this call only: reset when the op runs

    def route(query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        setattr(module, _FLEX_NO_COMPILE, no_compile)
        return (kernel if on_meta(query) else op)(query, *args, **kwargs)

    setattr(module, _FLEX_VALIDATE_DEVICE, validate_device)
    setattr(module, _FLEX_OP, route)
    try:
        yield
    finally:
        setattr(module, _FLEX_VALIDATE_DEVICE, validate)
        setattr(module, _FLEX_OP, op)
        setattr(module, _FLEX_NO_COMPILE, no_compile)


# -- autocast on the meta device -------------------------------------------------------------------
# ``torch.autocast(device_type="meta")`` raises (meta has no autocast dtype); a module that writes
# ``torch.autocast(device_type=x.device.type, enabled=False)`` (PEFT's LoRA on parameters) cannot
# run on the meta device. There is no per-module or per-thread way to change what ``torch.autocast``
# does, so ``meta_autocast_as_cpu`` rebinds ``torch.autocast`` for as long as it is active: only for
# the meta forwards of a model that needs it (see ``raised_by_meta_autocast``), and only for the
# thread that runs them; any other use, in any thread, behaves exactly like ``torch.autocast``.
_AUTOCAST_SOURCE = torch.amp.autocast_mode.__file__
_AUTOCAST = "autocast"  # the class's name in both torch and torch.amp


def raised_by_meta_autocast(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``torch.autocast``'s constructor (for the meta device: the
    only device type a replica's forward has)."""
    return any(
        frame.f_code.co_filename == _AUTOCAST_SOURCE for frame, _ in traceback.walk_tb(error.__traceback__)
    )


# torch's own ``F.linear`` (a builtin). DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear``
# process-wide (``memory_efficient_linear``, on by default) with a custom autograd Function that runs
# the same matmuls forward and backward; inside a custom Function's forward a trace sees no backward.
TORCH_LINEAR = torch._C._nn.linear
_REPLACED_LINEAR_PACKAGES = ("deepspeed",)


@contextmanager
def torch_linear() -> Iterator[None]:
    """In this thread, ``torch.nn.functional.linear`` is torch's own where DeepSpeed replaced it."""
    replaced = torch.nn.functional.linear
    if replaced is TORCH_LINEAR or not getattr(replaced, "__module__", "").startswith(
        _REPLACED_LINEAR_PACKAGES
    ):
        yield
        return
    thread = threading.get_ident()

    def linear(*args: Any, **kwargs: Any) -> torch.Tensor:
        return (TORCH_LINEAR if threading.get_ident() == thread else replaced)(*args, **kwargs)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = replaced


@contextmanager
def meta_autocast_as_cpu() -> Iterator[None]:
    """In this thread, ``torch.autocast(device_type="meta", ...)`` is the CPU's, which does nothing to meta tensors."""
    original = torch.autocast
    thread = threading.get_ident()

    class MetaAutocast(original):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            if device_type == "meta" and threading.get_ident() == thread:
                device_type = "cpu"
            super().__init__(device_type, *args, **kwargs)

    setattr(torch, _AUTOCAST, MetaAutocast)
    setattr(torch.amp, _AUTOCAST, MetaAutocast)
    try:
        yield
    finally:
        setattr(torch, _AUTOCAST, original)
        setattr(torch.amp, _AUTOCAST, original)
