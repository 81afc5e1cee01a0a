"""FLOPs declared by the user for modules whose matmuls no trace can see.

A Triton kernel or a CUDA extension computes its products outside the aten operators that torch's
flop counters (and this package's trace) recognize, so a model built on one would count those
matmuls as zero. ``declare_flops`` states a module's forward FLOPs as a function of its inputs'
shapes; wherever the package counts FLOPs, such a module's own ops are ignored and the declared
figure is used instead:

    from mfu_callbacks import declare_flops

    def fused_mlp_flops(module, args, kwargs):
        tokens = args[0].shape[:-1].numel()
        return 2 * tokens * 3 * module.hidden * module.intermediate  # gate, up and down products

    declare_flops(FusedTritonMLP, fused_mlp_flops, component="mlp")

The backward is ``backward`` times the forward when anything the module computes from (an input or
one of its parameters) requires a gradient: 2.0 (the default) is a linear-like op whose input and
weight gradients each cost one forward. ``dtype`` says what its matmuls run in when that is not the
run's dtype ("fp8" for Transformer Engine's layers under ``fp8_autocast``): MFU judges them against
that dtype's peak (``flops/dtypes.py``). A declaration by class applies to
instances of exactly that class; one by instance applies to that module alone (held by weak
reference) and takes precedence.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .dtypes import RUN_DTYPE
from .meta_copy.isolation import tensors_in

FlopsOfCall = Callable[[nn.Module, tuple, dict], float]


@dataclass(frozen=True, eq=False)
class Declaration:
    """What ``declare_flops`` recorded: forward FLOPs from shapes, the component, the backward factor.

    Compared by identity: blocks fold together (``replica.py``) only under the same declaration.
    """

    flops: FlopsOfCall
    component: str | None = None
    backward: float = 2.0
    dtype: str = RUN_DTYPE

    def flops_of_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[float, float]:
        """Forward FLOPs of one call and the backward FLOPs it needs should its output reach the loss."""
        forward = float(self.flops(module, args, kwargs))
        if not math.isfinite(forward) or forward < 0:
            raise ValueError(
                f"the FLOPs declared for {type(module).__name__} must be a finite number >= 0, got {forward!r}"
            )
        trains = torch.is_grad_enabled() and (
            any(t.requires_grad for t in tensors_in((args, kwargs)))
            or any(p.requires_grad for p in module.parameters())
        )
        return forward, forward * self.backward if trains else 0.0


_BY_CLASS: dict[type[nn.Module], Declaration] = {}
_BY_INSTANCE: weakref.WeakKeyDictionary[nn.Module, Declaration] = weakref.WeakKeyDictionary()


def declare_flops(
    target: type[nn.Module] | nn.Module,
    flops: FlopsOfCall,
    *,
    component: str | None = None,
    backward: float = 2.0,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Declare the forward FLOPs of a module class (exactly that class) or of one module instance.

    ``flops(module, args, kwargs)`` gets the module and the arguments of its forward and returns its
    forward FLOPs from their shapes (never their values: during the package's meta-device trace
    they have none). ``component`` names it in the breakdown (default: named by its path, as any
    module). ``backward`` is the backward FLOPs per forward FLOP (2.0: input and weight gradients).
    ``dtype``: what its matmuls run in ("fp8", "bf16", a torch dtype, ...), when not the run's dtype
    (None, the default): MFU judges its FLOPs against that dtype's peak.
    The module's forward must still run on the meta device (a fake or meta kernel, as
    ``torch.compile`` needs too), so that what follows it sees outputs of the right shape.
    """
    if not callable(flops):
        raise TypeError(f"flops must be callable as flops(module, args, kwargs), got {flops!r}")
    if not math.isfinite(backward) or backward < 0:
        raise ValueError(f"backward must be a finite factor >= 0, got {backward!r}")
    key = RUN_DTYPE if dtype is None else _dtype_key(dtype)
    declaration = Declaration(flops, component, float(backward), key)
    if isinstance(target, type) and issubclass(target, nn.Module):
        _BY_CLASS[target] = declaration
    elif isinstance(target, nn.Module):
        _BY_INSTANCE[target] = declaration
    else:
        raise TypeError(f"declare_flops needs an nn.Module subclass or instance, got {target!r}")


def _dtype_key(dtype: str | torch.dtype) -> str:
    """The peak table's key for a declared dtype; ValueError for one without a peak column."""
    from ..precision import COMPUTE_DTYPES, parse_compute_dtype

    key = parse_compute_dtype(dtype)
    if key not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype must be one of {', '.join(COMPUTE_DTYPES)} (or a torch dtype), got {dtype!r}"
        )
    return key


def declared(module: nn.Module) -> Declaration | None:
    """The declaration that applies to ``module``: its own, else its exact class's, else None."""
    return _BY_INSTANCE.get(module) or _BY_CLASS.get(type(module))
