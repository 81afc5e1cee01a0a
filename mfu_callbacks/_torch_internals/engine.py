"""The dispatch mode stack, the autograd engine and the profiler: what runs in this thread now, and the
tensors a wrapper subclass or a view holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import (
    TorchDispatchMode,  # noqa: F401 - re-exported: the base of every dispatch mode, FlopCounterMode's too
    _get_current_dispatch_mode_stack,
    _pop_mode,
    is_traceable_wrapper_subclass,
)


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


# -- the profiler ----------------------------------------------------------------------------------
def profiler_running() -> bool:
    """Whether a torch profiler (autograd's or kineto's) is already collecting in this process."""
    return bool(torch.autograd.profiler._is_profiler_enabled or torch._C._autograd._profiler_enabled())
