"""Which gradients the model needs, and what tensors made with grad mode off derive from: inside a custom autograd Function's forward (fp8
training's ``Float8Linear``), an fp8 matmul counts the backward products of the tensors its operands
were cast from, and is attributed to the parameter its weight was cast from (see ``trace.py``).

A mixin of ``MatmulRecorder``: ``_derive`` after each op run with grad mode off, ``_link`` when such a
tensor leaves the Function as its output (it then has an autograd node).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..._torch_internals import view_base, wrapped_tensors
from .isolation import tensors_in


class NeededGradients:
    """Which gradients the model needs (``trains``: a trainable parameter lies upstream), and per tensor
    made with grad mode off: the tensors requiring a gradient it derives from, the parameter
    it alone derives from (an fp8 cast of a weight), and the fp8 matmuls upstream whose result has not
    yet left as a custom Function's output."""

    _parameter_ids: set[int]  # the replica's parameters, set by the recorder
    _frozen: set[int]  # parameters that require a gradient although frozen (FSDP1), set by the recorder

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sources: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._origins: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._unlinked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._trains: dict[Any, bool] = {}  # autograd node -> whether a trainable parameter lies upstream

    def backward_products(
        self, *operands: Sequence[torch.Tensor], grad_mode_off: bool = False
    ) -> tuple[int, int]:
        """Of a matmul whose operands derive from the given tensors (one sequence per operand): how
        many gradient products the model needs, and how many more run only because a gradient was forced.
        ``grad_mode_off``: count them even with grad mode off (the sources of an fp8 matmul's operands)."""
        if not torch.is_grad_enabled() and not grad_mode_off:
            return 0, 0
        needed = sum(any(self.trains(t) for t in sources) for sources in operands)
        run = sum(any(requires_grad(t) for t in sources) for sources in operands)
        return needed, run - needed

    def trains(self, tensor: object) -> bool:
        """Whether the model needs this tensor's gradient: a trainable parameter lies upstream of it.

        A tensor that requires a gradient only because a hook said so (``requires_grad_()`` on an
        activation: a leaf that is no parameter) does not count, nor does anything derived from it alone.
        """
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            return False
        if tensor.grad_fn is None:
            return self._is_trainable(tensor)
        return self._reaches_parameter(tensor.grad_fn)

    def _reaches_parameter(self, root: Any) -> bool:
        """Depth first through the autograd graph below ``root`` to the leaves it accumulates into. Every
        node on the path to a trainable parameter reaches it too; each node is decided once per probe."""
        memo = self._trains
        if root in memo:
            return memo[root]
        stack = [(root, iter(root.next_functions))]
        while stack:
            node, children = stack[-1]
            for child, _ in children:
                if child is None:
                    continue
                known = memo.get(child)
                if known is None and not child.next_functions:  # AccumulateGrad: the leaf it fills
                    known = memo[child] = self._is_trainable(getattr(child, "variable", None))
                if known is None:
                    stack.append((child, iter(child.next_functions)))
                    break
                if known:
                    memo.update((ancestor, True) for ancestor, _ in stack)
                    return True
            else:
                memo[node] = False
                stack.pop()
        return False

    def _is_trainable(self, tensor: object) -> bool:
        """A parameter the model trains: not a frozen one that asks for a gradient (``frozen``)."""
        return (
            isinstance(tensor, torch.Tensor)
            and self._is_parameter(tensor)
            and id(view_base(tensor)) not in self._frozen
        )

    def _is_parameter(self, tensor: object) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        return id(view_base(tensor)) in self._parameter_ids or id(tensor) in self._parameter_ids

    def _grad_sources(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors requiring a gradient that ``tensor`` derives from through ops run with grad mode off
        (itself if it requires one); a tensor subclass (fp8 data and scale) derives from what its parts do."""
        sources = self._sources.get(tensor)
        if sources is not None:
            return sources
        if tensor.requires_grad:
            return (tensor,)
        return tuple(s for inner in wrapped_tensors(tensor) for s in self._grad_sources(inner))

    def _origin(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The parameter ``tensor`` is, or alone derives from with grad mode off (an fp8 cast of a weight)."""
        if self._is_parameter(tensor):
            return tensor
        origin = self._origins.get(tensor)
        if origin is None:
            inner = {id(o): o for o in (self._origin(t) for t in wrapped_tensors(tensor)) if o is not None}
            origin = next(iter(inner.values())) if len(inner) == 1 else None
        return origin

    def _derive(self, inputs: list[torch.Tensor], out: Any, fp8: Any) -> None:
        """Note what the results of an op run with grad mode off derive from, and the fp8 matmul it was."""
        outputs = list(tensors_in(out))
        sources = {id(s): s for t in inputs for s in self._grad_sources(t)}
        unlinked = {id(m): m for t in inputs for m in self._unlinked.get(t, ())}
        if fp8 is not None:
            unlinked[id(fp8)] = fp8
        origins = [self._origin(t) for t in inputs]
        origin = origins[0] if origins and all(o is origins[0] for o in origins) else None
        for tensor in outputs:
            if sources:
                self._sources[tensor] = tuple(sources.values())
            if unlinked:
                self._unlinked[tensor] = tuple(unlinked.values())
            if origin is not None:
                self._origins[tensor] = origin

    def _link(self, tensors: Any) -> None:
        """A tensor made with grad mode off now has an autograd node: it left a custom Function as its
        output, and the fp8 matmuls upstream get a backward where that node reaches the loss."""
        for tensor in tensors:
            unlinked = self._unlinked.get(tensor)
            if unlinked and tensor.grad_fn is not None:
                for matmul in unlinked:
                    matmul.output = tensor
                del self._unlinked[tensor]


def requires_grad(tensor: object) -> bool:
    return bool(getattr(tensor, "requires_grad", False))
