"""Record the matmuls of one forward pass of a meta-device replica, and what their backward needs.

The forward runs on the meta device (no data, no arithmetic) under a dispatch mode that sees every
aten matmul with its operands. Autograd has already run above the dispatcher, so each operand
still says whether it requires a gradient; the backward of a matmul computes one product per
operand that does (the input gradient where anything upstream trains, the weight gradient where
the weight trains), each as costly as the forward, provided its output reaches the loss the forward
returns, or without a loss anything it returns (autograd never runs the backward of a result that
was thrown away, e.g. the trial evaluation of a parametrization at registration). That is exactly
what autograd will run, so no backward pass is executed here.

An operand can require a gradient that the model does not need: PEFT's and transformers'
``enable_input_require_grads`` (switched on with gradient checkpointing) make the input embeddings'
output require one, so every first-layer input gradient runs although no trainable parameter lies
upstream. Model FLOPs count a backward product only where its operand derives from a trainable
parameter; the products that run only because of such a tensor are counted apart (``forced``), as
hardware FLOPs.

fp8 training runs its matmuls inside a custom autograd Function (torchao's ``Float8Linear``): its
forward casts the input and the weight to fp8 with grad mode off and multiplies them with
``_scaled_mm`` (or a ``torch.mm`` of two fp8 tensor subclasses), its backward, which no trace sees,
computes the input and weight gradients in fp8 too. So an fp8 matmul made with grad mode off counts
the backward products of the tensors its operands were cast from, provided its result leaves as the
output of a custom Function (the output's node then runs the backward), and is attributed to the
parameter its weight operand was cast from, exactly as the matmul it replaces. Other matmuls inside a
custom Function get no backward here: what its backward runs is unknown, and the real step counts it.

Sharded training (the recorder's ``shards``, ``frozen`` and ``copies``): ``shards`` (parameter id ->
``Shard``) names the weights this rank multiplies with only part of (tensor parallel): a matmul with
one counts the rank's share, and so does every matmul of activations that derive from its output alone
(``sharding.py``). ``frozen``: parameters that require a gradient in the step although frozen (FSDP1
flattens them with trainable ones): their gradients are hardware FLOPs only. ``copies``: parameters
whose matmuls several ranks run whole on the same batch (a replicated weight under tensor parallel):
the rank counts its share of their model FLOPs, and all as hardware.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..._torch_internals import (
    ASSERTION,
    FUSED_ATTENTION,
    READ_SCALAR,
    TorchDispatchMode,
    view_base,
)
from ..components import ATTENTION_SCORES, classify, component_of_parameter, windowed_scores
from ..dtypes import FP8, RUN_DTYPE, tagged
from ..matmul_ops import (
    attention_backward_flops,
    attention_flops,
    is_fp8,
    matmul_flops,
    operands,
)
from ..sharding import Shard
from .grad_sources import NeededGradients, requires_grad
from .isolation import tensors_in
from .recompute import RecomputeRegions
from .shares import RankShares

aten = torch.ops.aten


@dataclass
class ComponentFlops:
    """Forward, backward and recompute FLOPs of one component in one probe; ``forced``: the backward
    products that run only because a tensor was made to require a gradient the model does not need;
    ``kernel``: what a kernel computes beyond the model count, forward and backward (negative for the
    blocks flex_attention skips)."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0
    forced: float = 0.0
    kernel: float = 0.0


@dataclass
class _Matmul:
    component: str
    forward: float
    backward: float  # its backward products, run if its output reaches the forward's result
    output: torch.Tensor | None
    forced: float = 0.0  # backward products that run (as above) although the model needs no such gradient
    share: float = 1.0  # of forward and backward, what the kernel computes


class MatmulRecorder(RecomputeRegions, NeededGradients, RankShares, TorchDispatchMode):
    """Sums matmul FLOPs per component while a replica runs forward.

    Modules of the replica report entry and exit through hooks (``enter``/``exit``) so that each
    op is attributed to the innermost module, or to the module owning a parameter it multiplies by
    when that is not the innermost one (``owners``: parameter id -> paths of the modules holding it);
    a module's multiplicity scales ops inside a module that stands for several identical ones.
    Inside a module with declared FLOPs (``enter_declared``) no op is recorded: the declaration is.
    ``windows`` maps the path of an attention module with a window of keys to that window's slot:
    its scores and values are recorded as ``windowed_scores(slot)``. ``shards``, ``frozen`` and
    ``copies``: see sharded training in the module's docstring. ``finish`` turns the record into per-component totals. Checkpoint recompute is followed by
    ``RecomputeRegions`` (``recompute.py``); which gradients the model needs, and what ops inside a custom
    Function's forward derive from, by ``NeededGradients`` (``grad_sources.py``); the rank's share of
    sharded weights by ``RankShares`` (``shares.py``).
    """

    def __init__(
        self,
        parameter_ids: set[int],
        owners: Mapping[int, tuple[str, ...]] | None = None,
        windows: Mapping[str, int] | None = None,
        shards: Mapping[int, Shard] | None = None,
        frozen: set[int] | None = None,
        copies: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self._parameter_ids = parameter_ids
        self._copies = copies or {}
        self._frozen = frozen or set()  # parameters that require a gradient although frozen (FSDP1)
        self._shards = shards or {}
        self._owners = owners or {}
        self._windows = windows or {}
        self._stack: list[tuple[str, str, int]] = []  # (path, class name, multiplicity)
        self._declared: list[tuple[str | None, float, float, str] | None] = []  # open declared modules
        self._matmuls: list[_Matmul] = []
        self._assertions: dict[int, torch.Tensor] = {}  # results of ASSERTION, by id

    # -- module stack -------------------------------------------------------------------------
    def enter(self, path: str, class_name: str, multiplicity: int) -> None:
        self._stack.append((path, class_name, multiplicity))

    def exit(self) -> None:
        self._stack.pop()

    @property
    def _weight(self) -> int:
        weight = 1
        for _, _, multiplicity in self._stack:
            weight *= multiplicity
        return weight

    def _component(self, activation_matmul: bool, operands: tuple[object, ...] = ()) -> str:
        path = self._stack[-1][0] if self._stack else ""
        for operand in operands:
            owners = self._owners_of(operand)
            if owners and path not in owners:  # e.g. a fused loss multiplying by lm_head.weight itself
                return component_of_parameter(owners[0])
        component = classify(path, [name for _, name, _ in self._stack], activation_matmul=activation_matmul)
        if component == ATTENTION_SCORES and self._windows:
            for module_path, _, _ in reversed(self._stack):
                slot = self._windows.get(module_path)
                if slot is not None:
                    return windowed_scores(slot)
        return component

    def _owners_of(self, tensor: object) -> tuple[str, ...]:
        if not isinstance(tensor, torch.Tensor):
            return ()
        return self._owners.get(id(view_base(tensor))) or self._owners.get(id(tensor)) or ()

    # -- declared FLOPs (declared.py) -------------------------------------------------------------
    def enter_declared(
        self, component: str | None, forward: float, backward: float, dtype: str = RUN_DTYPE
    ) -> None:
        """A module with declared FLOPs starts (after ``enter``); inside a declared one, it adds nothing."""
        self._declared.append(None if self._declared else (component, forward, backward, dtype))

    def exit_declared(self, output: Any) -> None:
        """It returned ``output`` (before ``exit``): record its declared FLOPs, scaled by the multiplicity."""
        entry = self._declared.pop() if self._declared else None  # None: its flops function raised
        if entry is None:
            return
        component, forward, backward, dtype = entry
        tensors = list(tensors_in(output))
        reaching = next((t for t in tensors if t.grad_fn is not None), tensors[0] if tensors else None)
        weight = self._weight
        key = tagged(component or self._component(False), dtype)
        self.record(key, forward * weight, backward * weight, reaching)

    # -- recording -------------------------------------------------------------------------------
    def record(
        self,
        component: str,
        forward: float,
        backward: float,
        output: torch.Tensor | None,
        forced: float = 0.0,
        share: float = 1.0,
    ) -> None:
        """Add one matmul's FLOPs (already scaled by the module multiplicity) and the tensor it made; the
        kernel computes ``share`` of them."""
        matmul = _Matmul(component, forward, backward, output, forced, share)
        self._matmuls.append(matmul)
        if self._regions:
            self._regions[-1].append(matmul)

    def record_module_matmul(
        self, forward: float, operands_requiring_grad: int, output: torch.Tensor | None, forced: int = 0
    ) -> None:
        """For analytic substitutes: a matmul of the current module, counted from its shapes, with the
        backward products the model needs and those forced on it (see ``backward_products``)."""
        if self._declared:
            return
        weight = self._weight
        self.record(
            self._component(False),
            forward * weight,
            forward * operands_requiring_grad * weight,
            output,
            forward * forced * weight,
        )

    def finish(self, result: Any) -> dict[str, ComponentFlops]:
        """Totals per component, given what the forward returned: its loss, where it has one, is the
        root of the backward; otherwise every tensor it returns is."""
        self._link(tensors_in(result))
        loss = _loss(result)
        graph = _autograd_graph(result if loss is None else loss)
        totals: dict[str, ComponentFlops] = defaultdict(ComponentFlops)
        for matmul in self._matmuls:
            flops = matmul.forward
            if graph is None or matmul.output is None or matmul.output.grad_fn in graph:
                totals[matmul.component].backward += matmul.backward
                totals[matmul.component].forced += matmul.forced
                flops += matmul.backward
            totals[matmul.component].forward += matmul.forward
            totals[matmul.component].kernel += flops * (matmul.share - 1.0)
        for component, flops in self._recompute.items():
            totals[component].recompute += flops
        return dict(totals)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is READ_SCALAR and args[0].dtype == torch.bool:
            # A meta tensor has no value to read back. Boolean reads are checks such as
            # ``pad_token_id in input_ids`` or ``mask.any()`` that pick a warning or a mask layout,
            # never the matmuls; the replica takes the False branch. Other reads still fail.
            # An assertion about the data (ASSERTION, then a read) holds for any batch the model
            # accepts, such as image tokens matching image features: it reads True.
            return id(args[0]) in self._assertions
        out = func(*_on_meta(args), **kwargs)
        if func is ASSERTION:
            self._assertions[id(out)] = out  # held, so that its id is not reused during the probe
        local = self._local_share(func, args, kwargs, out) if self._shards or self._copies else 1.0
        if self._declared:
            return out
        inputs = list(tensors_in((args, kwargs)))
        self._link(inputs)
        grad_mode_off = not torch.is_grad_enabled()
        pair = operands(func, args)
        in_fp8 = pair is not None and (is_fp8(pair[0]) or is_fp8(pair[1]))
        fp8 = in_fp8 and grad_mode_off
        if pair is not None:
            first, second = pair
            forward = matmul_flops(func, args, out)
            if fp8:
                # An fp8 matmul inside a custom Function: the parameters its operands were cast from stand for them.
                first, second = (_either(self._origin(t), t) for t in pair)
                needed, forced = self.backward_products(
                    self._grad_sources(pair[0]), self._grad_sources(pair[1]), grad_mode_off=True
                )
            else:
                needed, forced = self.backward_products([first], [second])
            activation = not (self._is_parameter(first) or self._is_parameter(second))
            weight = self._weight
            # A whole weight on whole activations, run alike by ``copies`` ranks: this rank's share of
            # the model FLOPs; the kernel runs all of them.
            copies = self._copies_of(first, second) if local == 1.0 else 1
            self.record(
                tagged(self._component(activation, (first, second)), FP8 if in_fp8 else RUN_DTYPE),
                forward * weight * local / copies,
                forward * needed * weight * local / copies,
                out,
                forward * forced * weight * local,
                share=copies,
            )
        elif func in FUSED_ATTENTION:
            query, key, value = args[:3]
            self.record_attention(query, key, value, out[0], local=local)
        if grad_mode_off:
            self._derive(inputs, out, self._matmuls[-1] if fp8 else None)
        return out

    def record_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        share: float = 1.0,
        *,
        local: float = 1.0,
    ) -> None:
        """A fused attention kernel of the current module, of which the kernel computes ``share``; the
        rank runs ``local`` of it (its heads, under tensor parallel)."""
        forward = _attention_flops(query, key, value) * local
        grad = torch.is_grad_enabled()
        backward = attention_backward_flops(forward, *(grad and self.trains(t) for t in (query, key, value)))
        runs = attention_backward_flops(forward, *(grad and requires_grad(t) for t in (query, key, value)))
        weight = self._weight
        self.record(
            self._component(True),
            forward * weight,
            backward * weight,
            output,
            (runs - backward) * weight,
            share,
        )


def _either(tensor: torch.Tensor | None, otherwise: torch.Tensor) -> torch.Tensor:
    return otherwise if tensor is None else tensor


def _on_meta(args: tuple) -> tuple:
    """Arguments of one op, with CPU tensors moved to meta where they meet meta ones: a probe's image
    grids are real (the model reads their values), and what the model derives from them (positions,
    lengths) meets the replica's meta tensors. Zero-dimensional CPU tensors mix with any device."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not any(t.is_meta for t in tensors) or all(t.is_meta for t in tensors):
        return args
    return tuple(
        a.to("meta") if isinstance(a, torch.Tensor) and not a.is_meta and a.dim() else a for a in args
    )


def _loss(result: Any) -> torch.Tensor | None:
    """The loss a forward returned: ``.loss`` of a ModelOutput, a mapping's 'loss', or a scalar tensor.

    Autograd starts the backward there alone; other outputs (a VLM's image hidden states, the hidden
    states of every layer) get no backward unless they lead to the loss.
    """
    if isinstance(result, torch.Tensor):
        return result if result.dim() == 0 else None
    loss = result.get("loss") if isinstance(result, Mapping) else getattr(result, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _autograd_graph(result: Any) -> set | None:
    """Every autograd node the result's backward can reach; None when the result holds no graph to
    go by (a custom forward that returns nothing): then every matmul counts as reaching it."""
    stack = [t.grad_fn for t in tensors_in(result) if t.grad_fn is not None]
    if not stack:
        return None
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return seen


def _attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> float:
    """Fused attention of [B, H, L, D] tensors, key/value heads broadcast (GQA)."""
    batch, heads, q_len, qk_dim = query.shape
    return attention_flops(batch, heads, q_len, key.shape[-2], qk_dim, value.shape[-1])
