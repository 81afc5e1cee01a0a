"""The dataflow a real step's observer follows: for every tensor, whether it derives from the batch,
whether it carries a gradient training needs, which module's parameter alone it derives from; and from
that, the component and feature of each matmul (see ``observe.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .._torch_internals import (
    TorchDispatchMode,
    view_base,
    wrapped_tensors,
)
from .components import EMBEDDINGS, HEAD, OTHER, classify
from .counting.attention_windows import AttentionWindow, attention_window_of
from .dtypes import dtype_of_operands, tagged
from .features import WINDOW_FEATURES, Feature
from .meta_copy.isolation import tensors_in
from .observation import Observation, _Matmul, _TensorFacts


class TensorDataflow(TorchDispatchMode):
    """The observer's state and what it knows of tensors and modules; ``OpCounting`` (``observed_ops.py``)
    counts the ops, ``RealStepObserver`` (``observe.py``) attaches it to the model."""

    def __init__(self, model: nn.Module, batch: Any, windows: Sequence[AttentionWindow] = ()) -> None:
        """``windows``: the attention windows the batches are counted with (``TokenCounting.windows``):
        attention inside a module with one of them scales with that window's squares."""
        super().__init__()
        self.observation = Observation()
        self._slots = {
            id(module): list(windows).index(window)
            for module in model.modules()
            if (window := attention_window_of(module)) is not None and window in windows
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
        self._apply_patch: tuple[Any, Any] | None = None  # (ours, torch's) ``Function.apply``
        self._done = False
        self._declared_depth = 0  # inside a module with declared FLOPs: its ops are not recorded
        self._declared_calls: list[_Matmul] = []
        self._declared_nodes: set[Any] = set()  # autograd nodes made inside such a module
        self._model = model
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
