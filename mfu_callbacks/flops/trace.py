"""Record the matmuls of one forward pass of a meta-device replica, and what their backward needs.

The forward runs on the meta device (no data, no arithmetic) under a dispatch mode that sees every
aten matmul with its operands. Autograd has already run above the dispatcher, so each operand
still says whether it requires a gradient; the backward of a matmul computes one product per
operand that does (the input gradient where anything upstream trains, the weight gradient where
the weight trains), each as costly as the forward, provided its output reaches what the forward
returns (autograd never runs the backward of a result that was thrown away, e.g. the trial
evaluation of a parametrization at registration). That is exactly what autograd will run, so
no backward pass is executed here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

from .._torch_internals import CONVOLUTION_KERNEL, FUSED_ATTENTION, READ_SCALAR, TorchDispatchMode, view_base
from .components import ATTENTION_SCORES, classify, windowed_scores

aten = torch.ops.aten

_CONVOLUTIONS = (aten.convolution.default, CONVOLUTION_KERNEL)
# Matmul-like ops and the argument positions of their two operands.
_OPERANDS: dict[object, tuple[int, int]] = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    **{convolution: (0, 1) for convolution in _CONVOLUTIONS},
}


@dataclass
class ComponentFlops:
    """Forward, backward and recompute FLOPs of one component in one probe."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0


@dataclass
class _Matmul:
    component: str
    forward: float
    backward: float  # its backward products, run if its output reaches the forward's result
    output: torch.Tensor | None


class MatmulRecorder(TorchDispatchMode):
    """Sums matmul FLOPs per component while a replica runs forward.

    Modules of the replica report entry and exit through hooks (``enter``/``exit``) so that each
    op is attributed to the innermost module; a module's multiplicity scales ops inside a module
    that stands for several identical ones. ``finish`` turns the record into per-component totals.
    ``windows`` maps the path of an attention module with a window of keys to that window's slot:
    its scores and values are recorded as ``windowed_scores(slot)``.
    """

    def __init__(self, parameter_ids: set[int], windows: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self._parameter_ids = parameter_ids
        self._windows = windows or {}
        self._stack: list[tuple[str, str, int]] = []  # (path, class name, multiplicity)
        self._regions: list[list[_Matmul | None]] = []  # open checkpoint regions, innermost last
        self._matmuls: list[_Matmul] = []
        self._recompute: dict[str, float] = defaultdict(float)

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

    def _component(self, activation_matmul: bool) -> str:
        path = self._stack[-1][0] if self._stack else ""
        component = classify(path, [name for _, name, _ in self._stack], activation_matmul=activation_matmul)
        if component == ATTENTION_SCORES and self._windows:
            for module_path, _, _ in reversed(self._stack):
                slot = self._windows.get(module_path)
                if slot is not None:
                    return windowed_scores(slot)
        return component

    # -- activation checkpointing ---------------------------------------------------------------
    def checkpoint_reentrant(self, function: Callable, *args):
        """Stands in for torch's reentrant checkpoint (``checkpoint(..., use_reentrant=True)``).

        The real one runs the region without autograd; its backward reruns all of it, and only
        when one of its tensor arguments requires a gradient (parameters inside do not count: with
        none, the output requires no gradient and nothing inside gets a backward).
        """
        backward_runs = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        )
        with (
            self.recompute_region(early_stop=False, backward_runs=backward_runs),
            torch.set_grad_enabled(backward_runs),
        ):
            return function(*args)

    @contextmanager
    def recompute_region(self, *, early_stop: bool, backward_runs: bool | None = None) -> Iterator[None]:
        """Ops inside run again in the backward pass, as far as torch's checkpoint reruns them.

        Non-reentrant checkpoint (the default of transformers and torch) recomputes when the
        backward first unpacks a tensor the region saved, so it reruns nothing if autograd saved
        nothing there (``backward_runs=None`` decides from that). With ``early_stop`` (torch's
        default) it stops as soon as the last tensor saved in the forward is saved again: a matmul
        whose inputs are the last saved tensors (autograd saves inputs before the op runs) and the
        ops after it are not rerun, e.g. a layer's final projection when only a residual add follows.
        So each region records, in order, its matmuls and the moments autograd saves a tensor.
        """
        events: list[_Matmul | None] = []  # a matmul, or None where autograd saved a tensor
        self._regions.append(events)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._saved, _unpacked):
                yield
        finally:
            self._regions.pop()
            saves = [index for index, event in enumerate(events) if event is None]
            if backward_runs is None:
                backward_runs = bool(saves)
            if backward_runs:
                end = (saves[-1] if saves else 0) if early_stop else len(events)
                for event in events[:end]:
                    if event is not None:
                        self._recompute[event.component] += event.forward
            if self._regions:  # a nested region is recomputed as part of the outer one too
                self._regions[-1].extend(events)

    def _saved(self, tensor: torch.Tensor) -> torch.Tensor:
        self.note_saved()
        return tensor

    def note_saved(self) -> None:
        """Autograd saved a tensor for the backward (called by the pack hook, and by substitutes)."""
        if self._regions:
            self._regions[-1].append(None)

    # -- recording -------------------------------------------------------------------------------
    def record(self, component: str, forward: float, backward: float, output: torch.Tensor | None) -> None:
        """Add one matmul's FLOPs (already scaled by the module multiplicity) and the tensor it made."""
        matmul = _Matmul(component, forward, backward, output)
        self._matmuls.append(matmul)
        if self._regions:
            self._regions[-1].append(matmul)

    def record_module_matmul(
        self, forward: float, operands_requiring_grad: int, output: torch.Tensor | None
    ) -> None:
        """For analytic substitutes: a matmul of the current module, counted from its shapes."""
        weight = self._weight
        self.record(
            self._component(False), forward * weight, forward * operands_requiring_grad * weight, output
        )

    def finish(self, result: Any) -> dict[str, ComponentFlops]:
        """Totals per component, given what the forward returned (the root of its backward)."""
        graph = _autograd_graph(result)
        totals: dict[str, ComponentFlops] = defaultdict(ComponentFlops)
        for matmul in self._matmuls:
            totals[matmul.component].forward += matmul.forward
            if graph is None or matmul.output is None or matmul.output.grad_fn in graph:
                totals[matmul.component].backward += matmul.backward
        for component, flops in self._recompute.items():
            totals[component].recompute += flops
        return dict(totals)

    def _is_parameter(self, tensor: object) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        return id(view_base(tensor)) in self._parameter_ids or id(tensor) in self._parameter_ids

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is READ_SCALAR and args[0].dtype == torch.bool:
            # A meta tensor has no value to read back. Boolean reads are checks such as
            # ``pad_token_id in input_ids`` or ``mask.any()`` that pick a warning or a mask layout,
            # never the matmuls; the replica takes the False branch. Other reads still fail.
            return False
        out = func(*args, **kwargs)
        if func in _OPERANDS:
            first, second = (args[i] for i in _OPERANDS[func])
            if func in _CONVOLUTIONS:
                forward = flop_registry[aten.convolution](*args[:9], out_val=out)
            else:
                forward = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
            grads = 0
            if torch.is_grad_enabled():
                grads = sum(bool(getattr(t, "requires_grad", False)) for t in (first, second))
            activation = not (self._is_parameter(first) or self._is_parameter(second))
            weight = self._weight
            self.record(self._component(activation), forward * weight, forward * grads * weight, out)
        elif func in FUSED_ATTENTION:
            query, key, value = args[:3]
            forward = _attention_flops(query, key, value)
            q, k, v = (bool(t.requires_grad) and torch.is_grad_enabled() for t in (query, key, value))
            # Backward products, each half the forward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.
            backward = forward / 2 * (v + (q or k) + q + k)
            weight = self._weight
            self.record(self._component(True), forward * weight, backward * weight, out[0])
        return out


def _unpacked(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _autograd_graph(result: Any) -> set | None:
    """Every autograd node the result's backward can reach; None when the result holds no graph to
    go by (a custom forward that returns nothing): then every matmul counts as reaching it."""
    stack = [t.grad_fn for t in _tensors(result) if t.grad_fn is not None]
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
    """Scores plus values of fused attention: 2*B*H*Lq*Lk*(Dqk + Dv), key/value heads broadcast (GQA)."""
    batch, heads, q_len, qk_dim = query.shape
    k_len = key.shape[-2]
    v_dim = value.shape[-1]
    return 2.0 * batch * heads * q_len * k_len * (qk_dim + v_dim)
