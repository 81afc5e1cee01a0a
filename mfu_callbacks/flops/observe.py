"""Count the matmuls of one real training step as it runs: for models a meta-device copy cannot
trace (data-dependent routing, values read back to the host, patched instances), for what only the
real step shows (custom autograd backward code, which outputs reach the loss), and to check the copy.

While one micro-batch's forward and backward run, a dispatch mode watches every aten op. It only
observes: each op runs exactly as it would, on the real tensors, and no value is read back. From the
dataflow it sees, it follows for every tensor whether it derives from the batch and whether it
carries a gradient that training needs (one that reaches a trainable parameter), and it tells the
phases apart: the forward, the backward (autograd executing a node), and checkpoint recompute (a
forward rerun inside the backward).

- **Model FLOPs** follow the convention of ``trace.py``: each forward matmul, plus one product of the
  same cost for each operand that carries a needed gradient, counted when its result reaches the
  loss (its autograd node ran in the backward; for ops inside a custom ``autograd.Function``, the
  Function's output's node, or, where a kernel the dispatcher never sees wrote that output, that
  Function's own node, known by its sequence number). A matmul of a pass without grad (``no_grad``:
  a reference model, adapters disabled, a KL pass; a custom Function applied there too) counts its
  forward once. A fused head that recomputes its logits in the backward
  therefore counts like its unfused twin, and a gradient forced onto the embeddings (PEFT's
  ``enable_input_require_grads``) is not a model FLOP. A module with declared FLOPs
  (``declared.py``) counts its declaration instead of what runs inside it.
- **Hardware FLOPs** are every matmul that ran: the backward as observed, recompute included.

Each matmul is assigned to a component (by the module that owns its parameter operand, else the
innermost module running) and to the feature it scales with (``features.py``): a product of two
batch-derived operands scales with squared lengths (attention; inside a layer with a window, with
that window's squares), one with a weight operand with tokens (a head's on a selection of them, such
as TRL's fused head scoring the labelled positions only, with the labelled positions; another
selection with the real tokens), one of weights alone once per call. ``Observation.fit`` turns the
totals into per-feature coefficients, exact at the observed step's shape; a batch without token
streams scales by rows.
"""

from __future__ import annotations

import functools
import threading
from contextlib import suppress
from typing import Any

import torch
from torch import nn

from .._torch_internals import (
    current_autograd_node,
    leave_dispatch_mode,
    queue_backward_callback,
)
from .components import classify
from .declared import Declaration, declared
from .dtypes import tagged
from .features import Feature
from .meta_copy.isolation import tensors_in
from .observation import _Matmul, _TensorFacts
from .observed_dataflow import _merged
from .observed_ops import OpCounting


class RealStepObserver(OpCounting):
    """Watches one micro-batch's forward and backward on the real model (enter before the forward,
    leave any time after the backward: ops after the first backward ends are ignored).

    It leaves by itself as soon as it can: when the backward is over (finished or raised) and when
    the model's forward raises. Where the step fails elsewhere (between the forward and the backward,
    or before the forward), the recorder's next event leaves it.

    ``RealStepObserver(model, batch, windows)``: ``windows`` are the attention windows the batches are
    counted with (``TokenCounting.windows``): attention inside a module with one of them scales with
    that window's squares.
    """

    def _add_hooks(self) -> None:
        """Follow which module runs (and the modules with declared FLOPs), until ``close``."""
        for module in self._model.modules():

            def enter(mod: nn.Module, args: Any, _id: int = id(module)) -> None:
                self._stack.append(_id)

            def leave(mod: nn.Module, args: Any, output: Any) -> None:
                if self._stack:
                    self._stack.pop()

            self._handles.append(module.register_forward_pre_hook(enter))
            self._handles.append(module.register_forward_hook(leave, always_call=True))
            declaration = declared(module)
            if declaration is not None:
                path, classes = self._names[id(module)]
                self._watch_declared(module, path, classes, declaration)

    def _watch_declared(
        self, module: nn.Module, path: str, classes: list[str], declaration: Declaration
    ) -> None:
        """A module with declared FLOPs (``declare_flops``): nothing inside it is recorded, its declared
        forward is, with the declared backward where its output reaches the loss."""
        component = tagged(
            declaration.component or classify(path, classes, activation_matmul=False), declaration.dtype
        )

        def enter(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._declared_depth += 1
            if self._declared_depth > 1 or self._done or current_autograd_node() is not None:
                return  # nested, after the backward, or rerun by checkpointing inside it
            forward, backward = declaration.flops_of_call(mod, args, kwargs)
            products = backward / forward if forward else 0.0
            record = _Matmul(component, Feature.TOKENS, forward, products, declared=True)
            self.observation.matmuls.append(record)
            self._declared_calls.append(record)

        def leave(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._declared_depth -= 1
            if self._declared_depth == 0 and self._declared_calls:
                record = self._declared_calls.pop()
                first = next(tensors_in(output), None)
                if first is not None:
                    self._last.append((record, first))

        self._handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        self._handles.append(module.register_forward_hook(leave, with_kwargs=True, always_call=True))

    def __enter__(self) -> RealStepObserver:
        """Add the hooks, wrap the model's forward and enter the mode (all undone if any of it fails)."""
        self._thread = threading.get_ident()
        try:
            self._add_hooks()
            self._wrap_forward()
            self._wrap_function_apply()
            super().__enter__()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave the mode and remove every hook and the forward's wrapper; settle what was observed.

        Safe to call any number of times, from anywhere: the recorder's next event, the end of the
        backward (``_BackwardEnd``), a forward that raised. The mode is left only in the thread that
        entered it, where it must be the innermost mode; elsewhere the next call on that thread leaves it.
        """
        self._done = True  # whatever still reaches the mode runs unobserved
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._unwrap_forward()
            self._unwrap_function_apply()
        finally:
            if self._thread == threading.get_ident():
                leave_dispatch_mode(self)
        if self._closed:
            return
        self._closed = True
        if not self.observation.complete and self.observation.failure is None and self._in_backward:
            self.observation.failure = "the backward did not finish"
        try:
            self._read_nodes()
            self._resolve()
        except Exception as error:  # noqa: BLE001 - the observation is void, the step goes on
            self.observation.failure = f"{type(error).__name__}: {error}"

    def _wrap_forward(self) -> None:
        """The model's forward, called inside a ``try`` of ours: a forward that raises anything
        (KeyboardInterrupt, an out-of-memory error) ends the observation before the error leaves it."""
        model = self._model
        original = model.forward
        own = "forward" in vars(
            model
        )  # an instance's own forward (Accelerate's autocast wrapper, TRL's head)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except BaseException as error:
                if self.observation.failure is None:
                    self.observation.failure = f"the forward raised {type(error).__name__}"
                self.close()
                raise

        self._forward_patch = (forward, own, vars(model).get("forward"))
        model.forward = forward

    def _wrap_function_apply(self) -> None:
        """A custom autograd Function whose kernels the dispatcher never sees (Triton: Liger's RMSNorm,
        RoPE and SwiGLU) returns outputs the observer saw made from nothing, or not at all: they derive
        from what the Function was given (``_function_applied``), as they would through visible ops."""
        torchs = vars(torch.autograd.Function)["apply"]
        observer = self

        def apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
            out = torchs.__func__(cls, *args, **kwargs)
            if not observer._done and observer._thread == threading.get_ident():
                try:
                    observer._function_applied((args, kwargs), out)
                except Exception as error:  # noqa: BLE001 - observing never breaks the step: the observation is void
                    observer._done = True
                    observer.observation.failure = f"{type(error).__name__}: {error}"
            return out

        ours = classmethod(apply)
        self._apply_patch = (ours, torchs)
        torch.autograd.Function.apply = ours  # type: ignore[method-assign, assignment]

    def _unwrap_function_apply(self) -> None:
        patch, self._apply_patch = self._apply_patch, None
        if patch is not None and vars(torch.autograd.Function).get("apply") is patch[0]:
            torch.autograd.Function.apply = patch[1]  # type: ignore[method-assign]

    def _function_applied(self, inputs: Any, out: Any) -> None:
        """What a custom Function returns derives from the batch, and carries a needed gradient, where
        what it was given does (its own ops, if any were seen, may have said less: an allocation)."""
        given = [self._fact(t) for t in tensors_in(inputs)]
        if not given:
            return
        merged = _merged(given)
        for tensor in tensors_in(out):
            known = self._facts.get(tensor)
            if known is None:
                self._facts[tensor] = _TensorFacts(
                    merged.from_batch, merged.needs_grad, True, owner=merged.owner, subset=merged.subset
                )
            elif (merged.from_batch and not known.from_batch) or (merged.needs_grad and not known.needs_grad):
                self._facts[tensor] = _TensorFacts(
                    known.from_batch or merged.from_batch,
                    known.needs_grad or merged.needs_grad,
                    known.made_with_grad,
                    known.tags,
                    None if merged.from_batch else known.owner,
                    known.subset or merged.subset,
                )

    def _unwrap_forward(self) -> None:
        patch, self._forward_patch = self._forward_patch, None
        if patch is None:
            return
        ours, own, previous = patch
        if vars(self._model).get("forward") is not ours:
            return  # replaced since by someone else: theirs stays
        if own:
            self._model.forward = previous
        else:
            del self._model.forward

    def _backward_released(self) -> None:
        """The backward that ``_BackwardEnd`` was queued in is over (finished or raised): nothing is
        observed after it, so the mode and hooks go now, if in the thread that entered them."""
        if self._thread == threading.get_ident():
            self.close()

    def _start_backward(self) -> None:
        queue_backward_callback(_BackwardEnd(self))
        super()._start_backward()


class _BackwardEnd:
    """Queued in the observed backward: called when it finishes, and released with it, whether it
    finished or raised (the autograd engine drops its callbacks with the backward, in the thread
    that called it, after putting back that thread's dispatch modes): the observer leaves then."""

    def __init__(self, observer: RealStepObserver) -> None:
        self._observer = observer

    def __call__(self) -> None:
        self._observer._backward_finished()

    def __del__(self) -> None:
        with suppress(Exception):  # nothing may escape a finalizer; the recorder's next event leaves then
            self._observer._backward_released()
