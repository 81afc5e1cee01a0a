"""The ops of a real step, counted as they run (see ``observe.py``): each forward matmul with the
backward products the model needs, the observed backward and recompute, and at the end which matmuls'
results reached the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import BackwardCFunction

from .._torch_internals import (
    ATTENTION_BACKWARD,
    ATTENTION_FORWARD,
    current_autograd_node,
    custom_function_forward,
    node_sequence_number,
    view_base,
)
from .components import OTHER
from .dtypes import RUN_DTYPE, dtype_of_operands, retagged
from .features import Feature
from .matmul_ops import (
    attention_backward_flops,
    attention_backward_halves,
    attention_flops_per_square,
    matmul_flops,
    operands,
)
from .meta_copy.isolation import tensors_in
from .observation import _Matmul, _TensorFacts
from .observed_dataflow import TensorDataflow

aten = torch.ops.aten


class OpCounting(TensorDataflow):
    """The dispatch mode's counting: forward matmuls and attention, the backward's and the recompute's."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._done:
            return out
        try:
            self._observe(func, args, kwargs, out)
        except Exception as error:  # noqa: BLE001 - observing never breaks the step: the observation is void
            self._done = True
            self.observation.failure = f"{type(error).__name__}: {error}"
        return out

    def _observe(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self._read_nodes()
        node = current_autograd_node()
        if node is not None:
            self._in_backward_op(func, args, kwargs, out, node)
            return
        grad_enabled = torch.is_grad_enabled()
        function = None if grad_enabled else custom_function_forward()
        if function is None:
            self._grad_outside = grad_enabled
        inputs = list(tensors_in((args, kwargs)))
        outputs = list(tensors_in(out))
        facts = [self._fact(t) for t in inputs]
        carries = [self._carries_grad(t, grad_enabled, function) for t in inputs]
        from_batch = any(f.from_batch for f in facts) or not inputs  # a factory op: sized by the batch
        tags: frozenset[int] = (
            frozenset().union(*(f.tags for f in facts)) if not grad_enabled else frozenset()
        )
        if grad_enabled:
            for tensor, fact in zip(inputs, facts):
                if fact.tags and tensor.grad_fn is not None:  # a custom Function's output, used on
                    self._function_outputs.append((tensor.grad_fn, fact.tags))
        matmul = None if self._declared_depth else self._matmul(func, args, out, grad_enabled, function)
        if self._declared_depth and grad_enabled:
            self._last.append((_INSIDE_DECLARED, out))
        if matmul is not None and function is not None:
            tags = tags | {len(self.observation.matmuls) - 1}
        owners = {f.owner for f in facts}
        owner = owners.pop() if len(owners) == 1 and not from_batch else None
        subset = any(f.subset for f in facts) or _selects_tokens(func, args)
        result = _TensorFacts(from_batch, any(carries), grad_enabled, tags, owner, subset)
        for tensor in outputs:
            self._facts[tensor] = result
            if tags:
                self._tagged[tensor] = True
                base = view_base(tensor)
                if base is not tensor:  # written through a view (out=, copy_): the base holds the result
                    known = self._fact(base)
                    self._facts[base] = _TensorFacts(
                        known.from_batch,
                        known.needs_grad,
                        known.made_with_grad,
                        known.tags | tags,
                        known.owner,
                    )
                    self._tagged[base] = True

    def _matmul(
        self, func: Any, args: tuple, out: Any, grad_enabled: bool, function: int | None
    ) -> _Matmul | None:
        pair = operands(func, args)
        if pair is not None:
            component, feature = self._classify(pair)
            products = sum(self._carries_grad(t, grad_enabled, function) for t in pair)
            subset = feature == Feature.TOKENS and any(self._fact(t).subset for t in pair)
            matmul = _Matmul(component, feature, matmul_flops(func, args, out), products, subset=subset)
        elif func in ATTENTION_FORWARD:
            query, key, value = args[:3]
            needed = [self._carries_grad(t, grad_enabled, function) for t in (query, key, value)]
            halves = attention_backward_halves(*needed)  # backward products, each half the forward
            component = self._component_of((query,), True)
            per_square = attention_flops_per_square(func, query, value)
            matmul = _Matmul(component, self._squares(), per_square, halves / 2, per_unit=True)
            out = out[0]
        else:
            return None
        matmul.with_grad, matmul.function = grad_enabled if function is None else self._grad_outside, function
        self.observation.matmuls.append(matmul)
        if grad_enabled:
            self._last.append((matmul, out))
        return matmul

    def _in_backward_op(self, func: Any, args: tuple, kwargs: dict, out: Any, node: Any) -> None:
        """Hardware FLOPs of the backward: each matmul belongs to the component of the forward op whose
        node runs it, or of the parameter it multiplies, or of another matmul of the same node."""
        if not self._in_backward:
            self._in_backward = True
            self._start_backward()
        self._ran.add(node)
        if node in self._declared_nodes or self._declared_depth:
            return  # the backward (or recompute) of a module with declared FLOPs: the declaration counts it
        recompute = torch.is_grad_enabled()  # checkpoint recompute: a forward rerun inside the backward
        # What derives from the batch, for the recompute to classify its matmuls (its inputs may be
        # detached copies made just before, with grad mode still off).
        # And the module whose parameter alone it derives from: a weight cast to fp8 in the backward is
        # still that module's.
        inputs = list(tensors_in((args, kwargs)))
        facts = [self._fact(t) for t in inputs]
        from_batch = any(f.from_batch for f in facts) or not inputs
        owners = {f.owner for f in facts}
        owner_id = owners.pop() if len(owners) == 1 and not from_batch else None
        for tensor in tensors_in(out):
            self._facts[tensor] = _TensorFacts(from_batch, False, True, owner=owner_id)
        pair = operands(func, args)
        dtype = RUN_DTYPE
        if pair is not None:
            flops, per_unit = matmul_flops(func, args, out), False
            component: str | None
            if recompute:
                component, feature = self._classify(pair)
            else:
                component, feature = self._nodes.get(node, (None, Feature.TOKENS))
                owner = self._owner_component(pair)
                if component is None and owner is not None:
                    component = self._node_components.setdefault(node, owner)
                dtype = dtype_of_operands(pair)  # what ran: an fp8 forward's backward may run in another
                if component is not None:
                    component = retagged(component, dtype)
        elif func in ATTENTION_FORWARD or func in ATTENTION_BACKWARD:
            query, value = (args[0], args[2]) if func in ATTENTION_FORWARD else (args[1], args[3])
            flops = attention_flops_per_square(func, query, value)
            if func in ATTENTION_BACKWARD:  # dQ, dK, dV and dP: four halves of the forward
                flops = attention_backward_flops(flops, True, True, True)
            per_unit = True
            component, feature = self._nodes.get(node, (self._component_of((query,), True), self._squares()))
            out = out[0]
        else:
            return
        if recompute:  # the recomputed graph has nodes of its own: their backward belongs here too
            self._last.append((_Matmul(component or OTHER, feature, 0.0, 0.0), out))
        if recompute:
            self.observation.recomputed[(component or OTHER, feature, per_unit)] += flops
        elif component is None:
            self._unplaced.append((node, feature, flops, dtype))
        else:
            self.observation.hardware[(component, feature, per_unit)] += flops

    def _start_backward(self) -> None:
        """The observed backward begins: the outputs of custom Functions carrying tags are known now."""
        for tensor in list(self._tagged.keys()):
            if tensor.grad_fn is not None:
                self._function_outputs.append((tensor.grad_fn, self._fact(tensor).tags))

    def _backward_finished(self) -> None:
        self._done = True
        self.observation.complete = True

    def _read_nodes(self) -> None:
        """The autograd node of each grad-mode matmul's output (set by autograd after the op returns)."""
        for matmul, output in self._last:
            if matmul is _INSIDE_DECLARED:
                self._declared_nodes.update(t.grad_fn for t in tensors_in(output) if t.grad_fn is not None)
                continue
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                matmul.node = output.grad_fn
                self._nodes.setdefault(output.grad_fn, (matmul.component, matmul.feature))
        self._last.clear()

    def _resolve(self) -> None:
        """Which matmuls' backward the model needs: their result reached the loss."""
        reached_tags: set[int] = set()
        for node, tags in self._function_outputs:
            if node in self._ran:
                reached_tags |= tags
        # A custom Function's backward that multiplies no parameter of a module (fp8 casts of its weight made
        # there, say) belongs to the component of the matmuls its forward ran.
        forward_components: dict[Any, str] = {}
        for node, tags in self._function_outputs:
            if tags:
                forward_components.setdefault(node, self.observation.matmuls[min(tags)].component)
        for node, feature, flops, dtype in self._unplaced:
            component = self._node_components.get(node) or forward_components.get(node, OTHER)
            self.observation.hardware[(retagged(component, dtype), feature, False)] += flops
        # Inside a custom Function whose outputs a kernel the dispatcher does not see wrote (Triton), the
        # dataflow goes dark: a matmul of its forward with operands that carry needed gradients reaches
        # the loss when that Function's backward ran (its node is known by its sequence number). A
        # Function run under no_grad has a node that never runs, and a matmul outside any Function
        # with grad off has no backward products at all.
        functions_ran = {
            node_sequence_number(node) for node in self._ran if isinstance(node, BackwardCFunction)
        }
        for index, matmul in enumerate(self.observation.matmuls):
            matmul.reached = (
                (matmul.node is not None and matmul.node in self._ran)
                or index in reached_tags
                or (matmul.function is not None and matmul.products > 0 and matmul.function in functions_ran)
            )
            matmul.node = None
        self._nodes.clear()
        self._node_components.clear()
        self._unplaced.clear()
        self._ran.clear()
        self._function_outputs.clear()


# Marks, among the outputs whose autograd node is read, those of ops inside a module with declared FLOPs.
_INSIDE_DECLARED = _Matmul("", Feature.CALLS, 0.0, 0.0)


def _selects_tokens(func: Any, args: tuple) -> bool:
    """A boolean-mask selection (``hidden[mask]``, ``masked_select``): its result holds some tokens only."""
    if func.overloadpacket is aten.masked_select:
        return True
    if func.overloadpacket is aten.index and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    return False
