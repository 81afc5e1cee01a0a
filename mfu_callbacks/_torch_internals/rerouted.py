"""Names torch looks up when it runs, rerouted while a meta-device copy of the model runs: activation
checkpointing to its recorder, ``flex_attention`` to a meta kernel, ``torch.autocast`` to accept the meta
device, and ``F.linear`` back to torch's own where DeepSpeed replaced it."""

from __future__ import annotations

import inspect
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint

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
