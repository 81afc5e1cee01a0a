"""Every private torch name that mfu-callbacks uses, in this one module.

The FLOP engine runs a meta-device copy of the model under a dispatch mode and needs a few things
torch has no public API for: the dispatch mode class itself, the names of internal aten kernels,
a way to route activation checkpointing to its recorder, the dictionaries in which a module keeps
its hooks, the module inside a ``torch.compile`` wrapper, and (one patch of a public name) an
autocast that accepts the meta device. Each is named here with what it is for;
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
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401 - re-exported: the base of every dispatch mode, FlopCounterMode's too

_aten = torch.ops.aten

# -- aten kernels ----------------------------------------------------------------------------------
READ_SCALAR = (
    _aten._local_scalar_dense.default
)  # a value read back to Python: .item(), bool(tensor), `x in tensor`
# The reduction behind torch._check_tensor_all (transformers' ``torch_compilable_check``): an assertion
# about the data, e.g. that a VLM's image tokens match its image features, whose value is then read.
ASSERTION = _aten._is_all_true.default
CONVOLUTION_KERNEL = (
    _aten._convolution.default
)  # the kernel behind aten.convolution; same first nine arguments
# Fused attention kernels (query, key, value first). On the meta device SDPA decomposes into bmm
# today; these count it should a fused kernel be dispatched instead.
FUSED_ATTENTION_NAMES = (
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
)
FUSED_ATTENTION = frozenset(
    getattr(packet, overload)
    for packet in (getattr(_aten, name) for name in FUSED_ATTENTION_NAMES if hasattr(_aten, name))
    for overload in packet.overloads()
)


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken of (a weight's transpose inside ``F.linear`` is a view of the weight)."""
    return tensor._base if tensor._base is not None else tensor


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


# Composable distributed APIs (fully_shard, replicate) keep their state in a module's __dict__
# under keys that start with this (torch.distributed._composable.contract.generate_state_key).
COMPOSABLE_STATE_KEY_PREFIX = "__composable_api_state_key"

# torch.compile's wrapper (torch._dynamo.eval_frame.OptimizedModule) and where it keeps the model.
COMPILED_WRAPPER = "OptimizedModule"
COMPILED_ORIGINAL = "_orig_mod"

# -- activation checkpointing ----------------------------------------------------------------------
# Every caller of torch.utils.checkpoint.checkpoint (transformers holds it in a functools.partial,
# FSDP's CheckpointWrapper too) ends in one of two module-level names that checkpoint() looks up
# when it runs: CheckpointFunction (reentrant) and _checkpoint_without_reentrant_generator.
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
