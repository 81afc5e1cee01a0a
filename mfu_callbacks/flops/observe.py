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
from collections import defaultdict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.utils.weak import WeakIdKeyDictionary

from .._torch_internals import (
    ATTENTION_BACKWARD,
    ATTENTION_FORWARD,
    HEADS_SECOND_TO_LAST,
    TorchDispatchMode,
    current_autograd_node,
    custom_function_forward,
    leave_dispatch_mode,
    node_sequence_number,
    queue_backward_callback,
    view_base,
    wrapped_tensors,
)
from .components import EMBEDDINGS, HEAD, OTHER, classify
from .declared import Declaration, declared
from .dtypes import RUN_DTYPE, dtype_of_operands, retagged, tagged, without_grad
from .features import HARDWARE, MODEL, NUM_FEATURES, WINDOW_FEATURES, Feature
from .isolation import tensors_in
from .matmuls import matmul_flops, operands
from .trace import ComponentFlops
from .windows import Window, window_of

aten = torch.ops.aten


def attention_flops_per_square(func: Any, query: torch.Tensor, value: torch.Tensor) -> float:
    """Forward FLOPs of fused attention per (query, key) pair of one sequence: 2 * heads * (d_qk + d_v).

    Scores and values, each 2 * d per pair and head (FACTS.md). Query layouts: [B, H, L, D] (SDPA),
    [B, L, H, D] and [T, H, D] (the flash and memory-efficient kernels, variable lengths).
    """
    heads = query.shape[-2] if func in HEADS_SECOND_TO_LAST or query.dim() == 3 else query.shape[1]
    return 2.0 * heads * (query.shape[-1] + value.shape[-1])


@dataclass
class _TensorFacts:
    from_batch: bool
    needs_grad: bool  # carries a gradient that training needs (derives from a trainable parameter)
    made_with_grad: bool
    tags: frozenset[int] = frozenset()  # gradient-free forward matmuls upstream (inside a custom Function)
    owner: int | None = None  # id of the module whose parameter alone this tensor derives from
    subset: bool = False  # a selection of the batch's tokens (a boolean-mask index), not all of them


@dataclass
class _Matmul:
    component: str
    feature: Feature
    forward: float  # FLOPs at the observed step, or per unit of the feature (per_unit)
    products: float  # backward products the model needs, in forwards (one per operand carrying one)
    per_unit: bool = False
    with_grad: bool = True  # grad mode was on at the op, or where the custom Function running it was applied
    function: int | None = None  # the sequence number of the custom Function whose forward ran it
    subset: bool = False  # its batch operand holds a selection of the tokens (``hidden[mask]``)
    declared: bool = False  # a module's declared FLOPs (its backward is not observed but declared)
    node: Any = None  # the autograd node of its output (grad mode on), read after the op returns
    reached: bool = False


@dataclass
class Observation:
    """What one observed micro-batch ran, per component and feature."""

    matmuls: list[_Matmul] = field(default_factory=list)
    # The observed backward and checkpoint recompute, per (component, feature, per unit of the feature).
    hardware: dict[tuple[str, Feature, bool], float] = field(default_factory=lambda: defaultdict(float))
    recomputed: dict[tuple[str, Feature, bool], float] = field(default_factory=lambda: defaultdict(float))
    complete: bool = False  # a backward ran to its end
    failure: str | None = None  # why observing stopped, if it failed

    def totals(self) -> dict[tuple[str, Feature, bool, bool], ComponentFlops]:
        """Per (component, feature, per-unit): forward, model backward, checkpoint recompute, and the
        rest of the observed backward beyond the model's (``forced``: a custom backward's recompute,
        gradients forced onto inputs)."""
        totals: dict[tuple[str, Feature, bool, bool], ComponentFlops] = defaultdict(ComponentFlops)
        for matmul in self.matmuls:
            # A pass without grad (a custom Function's forward included, where it was applied with grad
            # off) is kept apart: it is no part of one forward of the model.
            component = matmul.component if matmul.with_grad else without_grad(matmul.component)
            key = (component, matmul.feature, matmul.per_unit, matmul.subset)
            totals[key].forward += matmul.forward
            if matmul.reached:
                totals[key].backward += matmul.forward * matmul.products
                if matmul.declared:  # what ran in its backward is the declaration, hardware too
                    totals[key].forced += matmul.forward * matmul.products
        labelled = self._labelled_components()
        for (name, feature, per_unit), flops in self.recomputed.items():
            feature = Feature.LABELLED if feature == Feature.TOKENS and name in labelled else feature
            totals[(name, feature, per_unit, False)].recompute += flops
        for (name, feature, per_unit), flops in self.hardware.items():
            feature = Feature.LABELLED if feature == Feature.TOKENS and name in labelled else feature
            totals[(name, feature, per_unit, False)].forced += flops
        for part in totals.values():  # the observed backward beyond the model's
            part.forced -= part.backward
        return dict(totals)

    def _labelled_components(self) -> set[str]:
        """Components whose token matmuls in the forward all scored the labelled positions (a head that
        scores only those): what their backward runs scales with them too. A custom backward's matmuls
        are placed by component only (its saved selection may be a tensor the observer no longer knows)."""
        labelled = {m.component for m in self.matmuls if m.feature == Feature.LABELLED}
        return labelled - {m.component for m in self.matmuls if m.feature == Feature.TOKENS}

    def fit(self, features: Sequence[Sequence[float]]) -> dict[str, list[list[float]]]:
        """Per component: [forward, backward, recompute, forced, kernel] coefficients per feature, exact
        at this step, whose features (``MODEL`` and ``HARDWARE`` rows) are given.

        A head that scores only the labelled positions (``Feature.LABELLED``) is fitted per labelled
        position, so its FLOPs follow each batch's labels. Where the batch names none (no ``labels``,
        ``shift_labels`` or TRL mask), it scales with the real tokens at this step's share, as does any
        other matmul on a selection of the tokens: its model coefficient is per real token, and
        ``kernel`` makes up the hardware count of the observed step.
        """
        model_row, hardware_row = features[MODEL], features[HARDWARE]
        coefficients: dict[str, list[list[float]]] = {}
        for (component, feature, per_unit, subset), flops in self.totals().items():
            if feature == Feature.LABELLED and model_row[feature] <= 0:
                feature, subset = Feature.TOKENS, True  # no labels to follow: per real token at this share
            if not hardware_row[Feature.TOKENS] and feature in (Feature.TOKENS, Feature.SQUARES):
                feature = Feature.ROWS  # a batch without token streams (images, tables): all scales by rows
            units = hardware_row[feature]
            if not per_unit and units <= 0:
                raise ValueError(
                    f"the observed step ran {component} matmuls that scale with {feature.name.lower()}, "
                    "of which its batch has none"
                )
            parts = coefficients.setdefault(component, [[0.0] * NUM_FEATURES for _ in range(5)])
            model_units = model_row[feature] if subset and model_row[feature] > 0 else units
            values = (flops.forward, flops.backward, flops.recompute, flops.forced)
            for index, (part, value) in enumerate(zip(parts, values)):
                part[feature] += value if per_unit else value / (model_units if index < 2 else units)
            if subset and not per_unit:
                model = flops.forward + flops.backward
                parts[4][feature] += model / units - model / model_units
        return coefficients


class RealStepObserver(TorchDispatchMode):
    """Watches one micro-batch's forward and backward on the real model (enter before the forward,
    leave any time after the backward: ops after the first backward ends are ignored).

    It leaves by itself as soon as it can: when the backward is over (finished or raised) and when
    the model's forward raises. Where the step fails elsewhere (between the forward and the backward,
    or before the forward), the recorder's next event leaves it.
    """

    def __init__(self, model: nn.Module, batch: Any, windows: Sequence[Window] = ()) -> None:
        """``windows``: the attention windows the batches are counted with (``TokenCounting.windows``):
        attention inside a module with one of them scales with that window's squares."""
        super().__init__()
        self.observation = Observation()
        self._slots = {
            id(module): list(windows).index(window)
            for module in model.modules()
            if (window := window_of(module)) is not None and window in windows
        }
        self._facts: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._names: dict[int, tuple[str, list[str]]] = {}  # id(module) -> (path, classes along it)
        self._owners: dict[int, int] = {}  # id(parameter or buffer) -> id(owning module)
        self._trainable: set[int] = set()
        self._stack: list[int] = []  # ids of the modules running, innermost last
        self._handles: list[Any] = []
        self._last: list[tuple[_Matmul, torch.Tensor]] = []  # matmuls whose autograd node is not read yet
        self._nodes: dict[Any, tuple[str, Feature]] = {}  # autograd node -> its forward matmul's place
        self._node_components: dict[Any, str] = {}  # node -> component of a parameter it multiplies
        self._unplaced: list[tuple[Any, Feature, float, str]] = []  # backward matmuls placed at the end
        self._ran: set[Any] = set()
        self._function_outputs: list[tuple[Any, frozenset[int]]] = []
        self._tagged: WeakIdKeyDictionary = (
            WeakIdKeyDictionary()
        )  # tensors carrying tags, to check at backward
        self._in_backward = False
        self._grad_outside = True  # grad mode at the last op outside a custom Function: at its apply
        self._done = False
        self._declared_depth = 0  # inside a module with declared FLOPs: its ops are not recorded
        self._declared_calls: list[_Matmul] = []
        self._declared_nodes: set[Any] = set()  # autograd nodes made inside such a module
        self._model = model
        self._apply_patch: tuple[Any, Any] | None = None  # (ours, torch's) ``Function.apply``
        self._forward_patch: tuple[Any, bool, Any] | None = (
            None  # (our forward, had one of its own, that one)
        )
        self._thread: int | None = None  # the thread that entered: the one whose mode stack holds this mode
        self._closed = False
        self._describe(model)
        for tensor in tensors_in(batch):
            self._facts[tensor] = _TensorFacts(from_batch=True, needs_grad=False, made_with_grad=True)

    def add_batch(self, batch: Any) -> None:
        """Another call's inputs are batch data too (the observation opened at a pass without grad
        before the micro-batch it is fitted to): what the step has not made or seen yet."""
        for tensor in tensors_in(batch):
            if tensor not in self._facts and id(view_base(tensor)) not in self._owners:
                self._facts[tensor] = _TensorFacts(from_batch=True, needs_grad=False, made_with_grad=True)

    # -- the model's structure ------------------------------------------------------------------
    def _describe(self, model: nn.Module) -> None:
        classes: dict[str, list[str]] = {"": [type(model).__name__]}
        for path, module in model.named_modules():
            if path:
                parent = path.rpartition(".")[0]
                classes[path] = [*classes.get(parent, []), type(module).__name__]
            self._names.setdefault(id(module), (path, classes[path]))
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                self._owners.setdefault(id(tensor), id(module))
                if tensor.requires_grad:
                    self._trainable.add(id(tensor))

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

    # -- entering and leaving: nothing of ours outlives the step, however it ends ----------------
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

    # -- facts about tensors --------------------------------------------------------------------
    def _fact(self, tensor: torch.Tensor) -> _TensorFacts:
        facts = self._facts.get(tensor)
        if facts is not None:
            return facts
        base = view_base(tensor)
        if id(base) in self._owners:  # a parameter or buffer of the model (or a view of one)
            return _TensorFacts(False, id(base) in self._trainable, True, owner=self._owners[id(base)])
        inner = wrapped_tensors(tensor)
        if inner:  # a subclass made around tensors the step made (fp8 data and its scale): theirs
            facts = _merged([self._fact(t) for t in inner])
            self._facts[tensor] = facts
            if facts.tags:
                self._tagged[tensor] = True
            return facts
        # Anything else made before the step is model state the step did not receive with the batch
        # (a weight gathered or unsharded by FSDP or DeepSpeed, a cached table): trainable if it asks.
        return _TensorFacts(False, tensor.requires_grad, True)

    def _carries_grad(self, tensor: torch.Tensor, grad_enabled: bool, function: int | None = None) -> bool:
        """Whether ``tensor``, used by an op running now, carries a gradient training needs.

        ``function``: the custom Function whose forward runs the op. With grad off outside one
        (``no_grad``: a reference model, adapters disabled, a KL or scoring pass) nothing does: no
        backward ever reaches that op, whatever its operands ask for.
        """
        if not grad_enabled and function is None:
            return False
        facts = self._fact(tensor)
        if not facts.needs_grad:
            return False
        if grad_enabled or facts.made_with_grad:
            # Autograd decides (a result made without grad carries one only as a custom Function's output).
            return tensor.requires_grad
        return True  # inside a custom Function's forward: as its inputs did

    # -- component and feature ------------------------------------------------------------------
    def _owner_component(self, operands: Sequence[torch.Tensor]) -> str | None:
        """The component of the module that owns a parameter operand (a fused head multiplies by
        ``lm_head.weight`` outside ``lm_head``'s forward: it is still the head)."""
        for operand in operands:
            owner = self._fact(operand).owner
            if owner is not None:
                path, classes = self._names[owner]
                component = classify(path, classes, activation_matmul=False)
                # An embedding's weight in a matmul (a lookup is none) is a tied output projection.
                return HEAD if component == EMBEDDINGS else component
        return None

    def _component_of(self, operands: Sequence[torch.Tensor], activation: bool) -> str:
        if not activation:
            owner = self._owner_component(operands)
            if owner is not None:
                return owner
        if not self._stack:
            return OTHER
        path, classes = self._names[self._stack[-1]]
        return classify(path, classes, activation_matmul=activation)

    # -- the dispatch mode ----------------------------------------------------------------------
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

    def _classify(self, operands: Sequence[torch.Tensor]) -> tuple[str, Feature]:
        """Component (with the matmul's dtype) and feature of a matmul seen in a forward (or recompute): two
        batch-derived operands scale with squared lengths (attention), one with tokens, none once per call."""
        from_batch = [self._fact(t).from_batch for t in operands]
        feature = self._squares() if all(from_batch) else Feature.TOKENS if any(from_batch) else Feature.CALLS
        component = self._component_of(operands, all(from_batch))
        return tagged(component, dtype_of_operands(operands)), self._labelled(component, feature, operands)

    def _labelled(self, component: str | None, feature: Feature, operands: Sequence[torch.Tensor]) -> Feature:
        """A head's matmul on a selection of the tokens (``hidden[labels != -100]``) scales with the
        labelled positions; any other matmul keeps its feature."""
        if feature == Feature.TOKENS and component == HEAD and any(self._fact(t).subset for t in operands):
            return Feature.LABELLED
        return feature

    def _squares(self) -> Feature:
        """Squared lengths, or those under the window of the innermost attention module that has one."""
        for module in reversed(self._stack):
            slot = self._slots.get(module)
            if slot is not None:
                return WINDOW_FEATURES[slot]
        return Feature.SQUARES

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
            # Backward products, each half the forward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.
            halves = needed[2] + (needed[0] or needed[1]) + needed[0] + needed[1]
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
            factor = 1.0 if func in ATTENTION_FORWARD else 2.0  # dQ, dK, dV and dP: four halves
            flops, per_unit = factor * attention_flops_per_square(func, query, value), True
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
        queue_backward_callback(_BackwardEnd(self))
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


# Marks, among the outputs whose autograd node is read, those of ops inside a module with declared FLOPs.
_INSIDE_DECLARED = _Matmul("", Feature.CALLS, 0.0, 0.0)


def _merged(facts: Sequence[_TensorFacts]) -> _TensorFacts:
    """What holds for a tensor made of tensors with these facts."""
    owners = {f.owner for f in facts}
    from_batch = any(f.from_batch for f in facts)
    return _TensorFacts(
        from_batch,
        any(f.needs_grad for f in facts),
        all(f.made_with_grad for f in facts),
        frozenset().union(*(f.tags for f in facts)),
        owners.pop() if len(owners) == 1 and not from_batch else None,
        any(f.subset for f in facts),
    )


def _selects_tokens(func: Any, args: tuple) -> bool:
    """A boolean-mask selection (``hidden[mask]``, ``masked_select``): its result holds some tokens only."""
    if func.overloadpacket is aten.masked_select:
        return True
    if func.overloadpacket is aten.index and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    return False
