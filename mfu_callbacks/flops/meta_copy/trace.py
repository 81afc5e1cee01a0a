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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..._torch_internals import (
    ASSERTION,
    FUSED_ATTENTION,
    READ_SCALAR,
    TorchDispatchMode,
    view_base,
    wrapped_tensors,
)
from ..components import ATTENTION_SCORES, classify, component_of_parameter, windowed_scores
from ..dtypes import FP8, RUN_DTYPE, tagged
from ..matmul_ops import (
    CONVOLUTIONS,
    attention_backward_flops,
    attention_flops,
    is_fp8,
    matmul_flops,
    operands,
)
from ..sharding import Shard
from .isolation import tensors_in

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


class MatmulRecorder(TorchDispatchMode):
    """Sums matmul FLOPs per component while a replica runs forward.

    Modules of the replica report entry and exit through hooks (``enter``/``exit``) so that each
    op is attributed to the innermost module, or to the module owning a parameter it multiplies by
    when that is not the innermost one (``owners``: parameter id -> paths of the modules holding it);
    a module's multiplicity scales ops inside a module that stands for several identical ones.
    Inside a module with declared FLOPs (``enter_declared``) no op is recorded: the declaration is.
    ``windows`` maps the path of an attention module with a window of keys to that window's slot:
    its scores and values are recorded as ``windowed_scores(slot)``. ``shards`` (parameter id ->
    ``Shard``) names the weights this rank multiplies with only part of (tensor parallel): a matmul
    with one counts the rank's share, and so does every matmul of activations that derive from its
    output alone (``sharding.py``). ``frozen``: parameters that require a gradient in the step although
    frozen (FSDP1 flattens them with trainable ones): their gradients are hardware FLOPs only.
    ``copies``: parameters whose matmuls several ranks run whole on the same batch (a replicated weight
    under tensor parallel): the rank counts its share of their model FLOPs, and all as hardware.
    ``finish`` turns the record into per-component totals.
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
        # The share of each tensor this rank holds where it is a part (tensor parallel): absent means all.
        self._held: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._owners = owners or {}
        self._windows = windows or {}
        self._stack: list[tuple[str, str, int]] = []  # (path, class name, multiplicity)
        self._declared: list[tuple[str | None, float, float, str] | None] = []  # open declared modules
        self._regions: list[list[_Matmul | None]] = []  # open checkpoint regions, innermost last
        self._matmuls: list[_Matmul] = []
        self._recompute: dict[str, float] = defaultdict(float)
        self._trains: dict[Any, bool] = {}  # autograd node -> whether a trainable parameter lies upstream
        # Made with grad mode off (inside a custom Function's forward): the tensors requiring a gradient it
        # derives from, the parameter it alone derives from (an fp8 cast of a weight), and the fp8 matmuls
        # upstream whose result has not yet left as a custom Function's output.
        self._sources: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._origins: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._unlinked: WeakIdKeyDictionary = WeakIdKeyDictionary()
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
                        self._recompute[event.component] += event.forward * event.share
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

    def backward_products(
        self, *operands: Sequence[torch.Tensor], grad_mode_off: bool = False
    ) -> tuple[int, int]:
        """Of a matmul whose operands derive from the given tensors (one sequence per operand): how
        many gradient products the model needs, and how many more run only because a gradient was forced.
        ``grad_mode_off``: count them even with grad mode off (the sources of an fp8 matmul's operands)."""
        if not torch.is_grad_enabled() and not grad_mode_off:
            return 0, 0
        needed = sum(any(self.trains(t) for t in sources) for sources in operands)
        run = sum(any(_requires_grad(t) for t in sources) for sources in operands)
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

    # -- inside a custom Function's forward (grad mode off) ----------------------------------------
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

    def _derive(self, inputs: list[torch.Tensor], out: Any, fp8: _Matmul | None) -> None:
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

    def _copies_of(self, *operands: Any) -> int:
        """Ranks that run this matmul alike, by its weight (1 unless it is replicated under tensor parallel)."""
        for operand in operands:
            if isinstance(operand, torch.Tensor):
                copies = self._copies.get(id(view_base(operand)))
                if copies:
                    return copies
        return 1

    def _local_share(self, func: Any, args: tuple, kwargs: dict, out: Any) -> float:
        """The share of this op that the rank runs, and (noted on its outputs) the share of them it holds.

        A matmul with a sharded weight runs the weight's share; its output is held in that share when
        the weight is split along the output's dimension (column-wise), whole when along the contracted
        one (row-wise: the partial sums are reduced). Any other op runs on, and holds, the least share
        of its inputs: a part derived from a part, combined with whole tensors, stays that part.
        """
        held = min((self._held.get(t, 1.0) for t in tensors_in((args, kwargs))), default=1.0)
        local = output_held = held
        pair = operands(func, args)
        if pair is not None and func.overloadpacket not in CONVOLUTIONS:
            first, second = pair
            for operand, output_dim in ((second, -1), (first, -2)):
                shard = self._shards.get(id(view_base(operand)))
                if shard is not None:
                    local = shard.fraction
                    output_held = shard.fraction if shard.splits(operand, output_dim) else 1.0
                    break
        if output_held < 1.0:
            for tensor in tensors_in(out):
                self._held[tensor] = output_held
        return local

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
        runs = attention_backward_flops(forward, *(grad and _requires_grad(t) for t in (query, key, value)))
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


def _requires_grad(tensor: object) -> bool:
    return bool(getattr(tensor, "requires_grad", False))


def _unpacked(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
