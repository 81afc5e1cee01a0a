"""The probes run on the replica: module hooks for the recorder's module stack, checkpoint and
flex_attention intercepted, analytic substitutes installed, one ``MatmulRecorder`` per probe."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..._torch_internals import (
    flex_attention_on_meta,
    global_module_hooks_limited_to,
    meta_autocast_as_cpu,
    raised_by_meta_autocast,
    torch_linear,
)
from ..counting.attention_windows import AttentionWindow, attention_window_of
from ..model_config import use_eager_kernels
from .checkpoint import checkpoint_to
from .flex import FlexKernel
from .isolation import preserved_random_state
from .probes import Forward, ProbeBatches
from .replica import Replica, build_replica, is_model_library_hook
from .substitutes import install_substitutes
from .trace import ComponentFlops, MatmulRecorder


@contextmanager
def _probe_hooks(
    replica: Replica, current: list[MatmulRecorder], *, meta_autocast: bool, build_length: int | None
) -> Iterator[None]:
    """Module-stack bookkeeping, checkpoint interception and flex_attention on meta tensors for the
    replica's forward, with only the model libraries' hooks among those registered for every module
    (a user's global hook never sees the probes) and torch's own ``F.linear`` (DeepSpeed ZeRO-3 puts
    one in a custom autograd Function, whose backward a trace cannot see); with ``meta_autocast``,
    ``torch.autocast(device_type="meta")`` does nothing instead of failing."""
    handles = []
    for module in replica.module.modules():
        path = replica.names.get(id(module), "")
        multiplicity = replica.multiplicity.get(id(module), 1)
        class_name = type(module).__name__
        declaration = replica.declarations.get(id(module))

        def enter(mod, args, kwargs, _path=path, _name=class_name, _mult=multiplicity, _declared=declaration):
            current[0].enter(_path, _name, _mult)
            if _declared is not None:
                forward, backward = _declared.flops_of_call(mod, args, kwargs)
                current[0].enter_declared(_declared.component, forward, backward, _declared.dtype)

        def leave(mod, args, output, _declared=declaration):
            if _declared is not None:
                current[0].exit_declared(output)
            current[0].exit()

        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, always_call=True))

    try:
        with (
            checkpoint_to(current),
            flex_attention_on_meta(FlexKernel(lambda: current[0], build_length)),
            global_module_hooks_limited_to(is_model_library_hook),
            meta_autocast_as_cpu() if meta_autocast else nullcontext(),
            torch_linear(),
        ):
            yield
    finally:
        for handle in handles:
            handle.remove()


def trace_probes(
    model: nn.Module,
    probes: ProbeBatches,
    shapes: Sequence[tuple[int, int, int]],
    run: Forward,
    *,
    fold: bool,
    windows: tuple[AttentionWindow, ...] = (),
) -> tuple[list[dict[str, ComponentFlops]], Replica, list[str]]:
    replica = build_replica(model, fold=fold)
    use_eager_kernels(replica.module)
    owners = replica.parameter_owners()
    slots = {
        replica.names[id(module)]: windows.index(window)
        for module in replica.module.modules()
        if (window := attention_window_of(module)) in windows and id(module) in replica.names
    }
    current: list[MatmulRecorder] = [
        MatmulRecorder(replica.parameter_ids, owners, slots, replica.shards, replica.frozen, replica.copies)
    ]
    substituted = install_substitutes(replica.module, _CurrentRecorder(current))

    def run_probes(meta_autocast: bool) -> list[dict[str, ComponentFlops]]:
        totals = []
        with (
            preserved_random_state(),
            _probe_hooks(replica, current, meta_autocast=meta_autocast, build_length=probes.main_length),
            torch.enable_grad(),
        ):
            for rows, main, decoder in shapes:
                recorder = MatmulRecorder(
                    replica.parameter_ids, owners, slots, replica.shards, replica.frozen, replica.copies
                )
                current[0] = recorder
                with recorder:
                    result = run(replica.module, probes.make(rows, main, decoder))
                totals.append(recorder.finish(result))
        return totals

    try:
        return run_probes(meta_autocast=False), replica, substituted
    except Exception as error:
        if not raised_by_meta_autocast(error):
            raise
    # The model opens torch.autocast on its inputs' device type (PEFT's LoRA on parameters does): only then,
    # and only for these meta forwards, is autocast told to accept the meta device.
    return run_probes(meta_autocast=True), replica, substituted


class _CurrentRecorder:
    """Lets substitutes installed once record into whichever probe's recorder is current."""

    def __init__(self, current: list[MatmulRecorder]) -> None:
        self._current = current

    def record_module_matmul(
        self, forward: float, operands_requiring_grad: int, output: torch.Tensor | None, forced: int = 0
    ) -> None:
        self._current[0].record_module_matmul(forward, operands_requiring_grad, output, forced)

    def backward_products(self, *operands: Sequence[torch.Tensor]) -> tuple[int, int]:
        return self._current[0].backward_products(*operands)

    def note_saved(self) -> None:
        self._current[0].note_saved()
