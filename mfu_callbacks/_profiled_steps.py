"""A few steps under ``torch.profiler``, turned into the kernels ``attribution.py`` splits into buckets.

The profiled steps begin at a step boundary after a device sync, so the GPU starts it idle, and closes at the
boundary after its last step, after another sync: the span between is the profiled steps' wall time,
input wait included. These steps are left out of the MFU averages (the syncs and the profiler slow
them). While it is open, every module that owns parameters, and every attention module, runs inside
a ``record_function`` range naming its model component; a kernel belongs to the innermost range of
the op that launched it. Backward kernels find their component through the autograd node that
launched them: its sequence number is that of the forward op that created it.

On a CUDA device the kernels are the GPU's; on the CPU, the innermost operators, whose time is the
work (what the operators' dispatch adds shows as time the device waited for the host).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import attribution
from ._torch_internals import profiler_running
from .attribution import Breakdown, Kernel
from .flops import is_compiled
from .flops.components import ATTENTION_SCORES, classify
from .flops.matmul_ops import PROFILED_GEMMS, gemm_flops

logger = logging.getLogger("mfu_callbacks")

_PREFIX = "mfu::"
_COMPONENT = _PREFIX + "component::"
_SPAN = _PREFIX + "profiled_steps"
_BETWEEN = _PREFIX + "between_steps"
_BACKWARD = "autograd::engine::evaluate_function: "
_OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")
_ATTENTION_WORDS = (
    "scaled_dot_product",
    "flash_attention",
    "efficient_attention",
    "cudnn_attention",
    "flex_attention",
)
_COMMUNICATION_WORDS = ("nccl", "c10d::", "gloo")


def profiler_unavailable() -> str | None:
    """Why no profile can be taken now, or None: another profiler already runs, or there is none."""
    try:
        from torch.profiler import profile  # noqa: F401 - availability only
    except ImportError as error:  # a build without the profiler
        return f"torch.profiler cannot be imported ({error})"
    if profiler_running():
        return "another profiler is already running in this process"
    return None


class ProfiledSteps:
    """Profiles ``steps`` optimizer steps from step ``start`` (0-based) and keeps their breakdown."""

    def __init__(self, model: nn.Module, device: torch.device, steps: int, start: int) -> None:
        self.steps = steps
        self.start = start
        self.result: Breakdown | None = None
        self.skipped: str | None = None  # the line saying why no profile was taken
        self._model = model
        self._device = device
        self._profiler: Any = None
        self._span: Any = None
        self._between: Any = None
        self._hooks: list[Any] = []
        self._open_ranges: list[Any] = []
        self._profiled = 0
        self._features: torch.Tensor | None = None
        self._engine: Any = None

    @property
    def is_open(self) -> bool:
        return self._profiler is not None

    @property
    def finished(self) -> bool:
        return self.result is not None or self.skipped is not None

    def step_begins(self, index: int, context: Callable[[], tuple[float | None, int]]) -> bool:
        """Step ``index`` begins: begins or ends the profiling at its boundaries; whether it is profiled.

        ``context`` gives the peak FLOP/s and the matmul size multiple for the advice, when it closes.
        """
        if self.finished:
            return False
        if self.is_open:
            self._leave_between()
            if self._profiled >= self.steps:
                self.close(*context())
                return False
            self._profiled += 1
            return True
        if index < self.start:
            return False
        self._open()
        if not self.is_open:
            return False
        self._profiled = 1
        return True

    def step_ends(self) -> None:
        """The profiled step's optimizer step ended: the host is between steps until the next begins."""
        if self.is_open:
            self._between = torch.profiler.record_function(_BETWEEN)
            self._between.__enter__()

    def add_batch(self, batch: Any, engine: Any) -> None:
        """Count a profiled micro-batch's model FLOPs with the FLOP engine (when there is one)."""
        if not self.is_open or engine is None:
            return
        try:
            counted = engine.count(batch)
        except Exception:  # noqa: BLE001 - the profile goes on without the model FLOPs
            return
        self._engine = engine
        self._features = counted if self._features is None else self._features + counted

    def _open(self) -> None:
        reason = profiler_unavailable()
        if reason is not None:
            self._skip(reason)
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self._device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        try:
            _synchronize(self._device)
            self._profiler = profile(activities=activities, record_shapes=True)
            self._profiler.__enter__()
            self._hooks = _label_components(self._model, self._open_ranges)
            self._span = torch.profiler.record_function(_SPAN)
            self._span.__enter__()
        except Exception as error:  # noqa: BLE001 - a profile is optional
            self._remove_hooks()
            self._profiler = None
            self._skip(f"the profiler could not start ({error})")

    def _leave_between(self) -> None:
        if self._between is not None:
            self._between.__exit__(None, None, None)
            self._between = None

    def close(self, peak_flops: float | None = None, alignment: int = 8) -> None:
        """End the profiling now (at a step boundary, or when the run ends) and analyse the steps."""
        if not self.is_open:
            return
        profiler, self._profiler = self._profiler, None
        try:
            self._leave_between()
            _synchronize(self._device)
            self._span.__exit__(None, None, None)
            self._remove_hooks()
            profiler.__exit__(None, None, None)
            events = profiler.profiler.kineto_results.events()
            self.result = analyse(
                events,
                steps=self._profiled,
                device=self._device,
                model_flops=self._model_flops(),
                peak_flops=peak_flops,
                alignment=alignment,
            )
        except Exception as error:  # noqa: BLE001 - a profile is optional
            self._remove_hooks()
            self._skip(f"the profile could not be analysed ({error})")

    def _model_flops(self) -> dict[str, float] | None:
        """The model FLOPs per profiled step, by component (read back once: the profiled steps are not timed)."""
        if self._features is None or self._engine is None:
            return None
        flops = self._engine.evaluate(self._features.cpu())
        return {name: value / self._profiled for name, value in flops.breakdown.items() if value}

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        while self._open_ranges:  # a forward that raised left its range open
            self._open_ranges.pop().__exit__(None, None, None)

    def _skip(self, reason: str) -> None:
        self.skipped = f"no step-time breakdown: {reason}"
        logger.warning("mfu_callbacks: %s", self.skipped)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _label_components(model: nn.Module, open_ranges: list[Any]) -> list[Any]:
    """Forward hooks that run each parameter-owning or attention module inside a range naming its component."""
    if is_compiled(model):
        return []  # hooks would make the compiled graph recompile: its matmuls stay unattributed
    hooks = []
    classes: dict[str, list[str]] = {"": [type(model).__name__]}
    for path, module in model.named_modules():
        if path:
            parent = path.rpartition(".")[0]
            classes[path] = [*classes.get(parent, []), type(module).__name__]
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        component = classify(path, classes[path], activation_matmul=not owns_parameters)
        if component != ATTENTION_SCORES and not owns_parameters:
            continue
        label = _COMPONENT + component

        def enter(module: nn.Module, args: Any, _label: str = label) -> None:
            scope = torch.profiler.record_function(_label)
            scope.__enter__()
            open_ranges.append(scope)

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        hooks.append(module.register_forward_pre_hook(enter))
        hooks.append(module.register_forward_hook(leave))
    return hooks


# -- from the trace to kernels -----------------------------------------------------------------------
class _Op:
    """A host-side event of the trace (an operator or a range), with its enclosing event."""

    __slots__ = ("name", "start", "end", "thread", "fwd_thread", "sequence", "shapes", "parent")

    def __init__(self, event: Any) -> None:
        self.name: str = event.name()
        self.start: int = event.start_ns()
        self.end: int = event.end_ns()
        self.thread: int = event.start_thread_id()
        self.fwd_thread: int = event.fwd_thread_id()
        self.sequence: int = event.sequence_nr()
        self.shapes: list = event.shapes()
        self.parent: _Op | None = None

    def ancestors(self) -> Iterable[_Op]:
        op: _Op | None = self
        while op is not None:
            yield op
            op = op.parent


def analyse(
    events: Sequence[Any],
    *,
    steps: int,
    device: torch.device,
    model_flops: Mapping[str, float] | None = None,
    peak_flops: float | None = None,
    alignment: int = 8,
) -> Breakdown:
    """The breakdown of a trace's profiled span (kineto events of ``torch.profiler``)."""
    on_host = [event for event in events if _on_host(event)]
    host = [_Op(event) for event in on_host]
    _nest(host)
    spans = [op for op in host if op.name == _SPAN]
    if not spans:
        raise ValueError("the trace holds no profiled span")
    span = (spans[0].start * 1e-9, spans[0].end * 1e-9)
    between = [(op.start * 1e-9, op.end * 1e-9) for op in host if op.name == _BETWEEN]
    components = _forward_components(host)
    if device.type == "cuda":
        ranges = {op.name for op in host if not op.name.startswith("aten::")}
        # Kernels link to the operator that launched them (runtime calls link too: left out, their ids
        # are the driver's, not the operators').
        by_correlation = {
            event.correlation_id(): op
            for event, op in zip(on_host, host)
            if event.linked_correlation_id() == 0
        }
        kernels = [
            _kernel(
                event.name(),
                event.start_ns(),
                event.end_ns(),
                by_correlation.get(event.linked_correlation_id()),
                components,
            )
            for event in events
            if not _on_host(event) and _is_device_work(event, ranges)
        ]
    else:
        kernels = _self_time_kernels(host, components)
    return attribution.breakdown(
        kernels, span, steps, between, model_flops=model_flops, peak_flops=peak_flops, alignment=alignment
    )


def _self_time_kernels(host: Sequence[_Op], components: Mapping[tuple[int, int], str]) -> list[Kernel]:
    """On the CPU: each operator's own time (its interval less its operators'), as its kernels.

    Nested operators do not overlap this way, so every instant of operator work counts once; a
    matmul's FLOPs go with its longest piece.
    """
    children: dict[int, list[_Op]] = {}
    for op in host:
        if op.parent is not None and op.name.startswith("aten::"):
            children.setdefault(id(op.parent), []).append(op)
    kernels = []
    for op in host:
        if not op.name.startswith("aten::"):
            continue
        pieces, cursor = [], op.start
        for child in sorted(children.get(id(op), ()), key=lambda child: child.start):
            if child.start > cursor:
                pieces.append((cursor, child.start))
            cursor = max(cursor, child.end)
        if op.end > cursor:
            pieces.append((cursor, op.end))
        if not pieces:
            continue
        whole = _kernel(op.name, op.start, op.end, op, components)
        longest = max(pieces, key=lambda piece: piece[1] - piece[0])
        for start, end in pieces:
            flops = whole.flops if (start, end) == longest else 0.0
            kernels.append(replace(whole, start=start * 1e-9, end=end * 1e-9, flops=flops))
    return kernels


def _is_device_work(event: Any, ranges: set[str]) -> bool:
    """Kernels, copies and fills; not the device-side marks of ranges (``gpu_user_annotation``), which
    span the kernels launched inside a ``record_function`` and would double their time. Older torch
    has no activity type on its events: a mark carries the name of its range on the host."""
    activity = getattr(event, "activity_type", None)
    if activity is not None:
        return any(kind in str(activity()).lower() for kind in ("kernel", "memcpy", "memset"))
    return event.name() not in ranges


def _on_host(event: Any) -> bool:
    return str(event.device_type()).endswith("CPU")


def _nest(ops: list[_Op]) -> None:
    """Set each op's enclosing op: per thread, the innermost earlier op whose interval holds it."""
    by_thread: dict[int, list[_Op]] = {}
    for op in ops:
        by_thread.setdefault(op.thread, []).append(op)
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda op: (op.start, -op.end))
        stack: list[_Op] = []
        for op in thread_ops:
            while stack and stack[-1].end < op.end:
                stack.pop()
            op.parent = stack[-1] if stack else None
            stack.append(op)


def _forward_components(ops: Iterable[_Op]) -> dict[tuple[int, int], str]:
    """The component of each forward op that created an autograd node, by (thread, sequence number)."""
    components: dict[tuple[int, int], str] = {}
    for op in ops:
        if op.sequence >= 0 and not op.name.startswith(_BACKWARD):
            component = _label_of(op)
            if component is not None:
                components[(op.thread, op.sequence)] = component
    return components


def _label_of(op: _Op) -> str | None:
    for ancestor in op.ancestors():
        if ancestor.name.startswith(_COMPONENT):
            return ancestor.name[len(_COMPONENT) :]
    return None


def _component(op: _Op, components: Mapping[tuple[int, int], str]) -> str | None:
    """The innermost component range around ``op``; in the backward, that of the forward op whose
    autograd node runs it."""
    for ancestor in op.ancestors():
        if ancestor.name.startswith(_COMPONENT):
            return ancestor.name[len(_COMPONENT) :]
        if ancestor.name.startswith(_BACKWARD):
            return components.get((ancestor.fwd_thread, ancestor.sequence)) or components.get(
                (ancestor.thread, ancestor.sequence)
            )
    return None


def _kernel(
    name: str, start_ns: int, end_ns: int, op: _Op | None, components: Mapping[tuple[int, int], str]
) -> Kernel:
    """One kernel: its kind from its name and the ops around its launch, its component and FLOPs."""
    start, end = start_ns * 1e-9, end_ns * 1e-9
    lowered = name.lower()
    if any(word in lowered for word in _COMMUNICATION_WORDS):
        return Kernel(start, end, "communication")
    if lowered.startswith(("memcpy", "memset")):
        return Kernel(start, end, attribution.MEMORY)
    if op is None:
        return Kernel(start, end, attribution.ELEMENTWISE)
    names = [ancestor.name for ancestor in op.ancestors()]
    if any(n.startswith(_OPTIMIZER) for n in names):
        return Kernel(start, end, attribution.OPTIMIZER)
    if any(any(word in n.lower() for word in _COMMUNICATION_WORDS) for n in names):
        return Kernel(start, end, "communication")
    if any(any(word in n for word in _ATTENTION_WORDS) for n in names):
        return Kernel(start, end, attribution.ATTENTION)
    factors = PROFILED_GEMMS.get(op.name)
    if factors is not None:
        dims = _matmul_dims(op.shapes, factors)
        first, second = (list(op.shapes[i]) if len(op.shapes) > i else [] for i in factors)
        flops = gemm_flops(first, second) if len(first) >= 2 and len(second) >= 2 else 0.0
        return Kernel(start, end, attribution.MATMUL, _component(op, components), flops, dims[:3])
    return Kernel(start, end, attribution.ELEMENTWISE)


def _matmul_dims(shapes: Sequence[Sequence[int]], factors: tuple[int, int]) -> tuple[int, ...]:
    """(m, n, k[, batch]) of a matmul from its operands' shapes; () when they are not recorded."""
    first, second = factors
    if len(shapes) <= second:
        return ()
    a, b = list(shapes[first]), list(shapes[second])
    if len(a) == 2 and len(b) == 2:
        return (a[0], b[1], a[1])
    if len(a) == 3 and len(b) == 3:
        return (a[1], b[2], a[2], a[0])
    return ()
