"""Every private torch name that mfu-callbacks uses, in this one package.

The FLOP engine runs a meta-device copy of the model under a dispatch mode and needs a few things
torch has no public API for: the dispatch mode class itself, the names of internal aten kernels,
a way to route activation checkpointing to its recorder, the dictionaries in which a module keeps
its hooks (per module and for every module at once), the keyword arguments of a module call (a hook
for every module is not handed them), the module inside a ``torch.compile`` wrapper, the tensors a
tensor subclass wraps, a way to run ``flex_attention`` on meta tensors, and (one patch of a public
name) an autocast that accepts the meta device. Each is named with what it is for, in one module per
family: ``aten`` (kernels), ``engine`` (dispatch modes, autograd, profiler), ``modules`` (hooks and
wrappers), ``rerouted`` (names rebound while a meta copy runs); this ``__init__`` re-exports them.
``tests/test_torch_internals.py`` checks that every one still exists in the installed torch, so an
upgrade that renames one fails that test (the callbacks' guard would otherwise reduce the breakage
to one log line), and that no other module of the package reaches for a private torch name.
"""

from __future__ import annotations

from .aten import (
    ASSERTION,
    ATTENTION_BACKWARD,
    ATTENTION_BACKWARD_NAMES,
    ATTENTION_FORWARD,
    ATTENTION_KERNEL_NAMES,
    CONVOLUTION_KERNEL,
    EXTRA_MATMULS,
    FUSED_ATTENTION,
    FUSED_ATTENTION_NAMES,
    HEADS_SECOND_TO_LAST,
    READ_SCALAR,
    SYNCING_OPERATIONS,
)
from .engine import (
    TorchDispatchMode,
    current_autograd_node,
    custom_function_forward,
    dispatch_mode_stack,
    leave_dispatch_mode,
    node_sequence_number,
    profiler_running,
    queue_backward_callback,
    view_base,
    wrapped_tensors,
)
from .modules import (
    COMPILED_IN_PLACE,
    COMPILED_ORIGINAL,
    COMPILED_WRAPPER,
    COMPOSABLE_STATE_KEY_PREFIX,
    FORWARD_HOOK_DICTS,
    FSDP1_WRAPPER,
    OTHER_HOOK_DICTS,
    FlattenedParameter,
    call_keywords,
    fsdp1_flattened_parameters,
    fsdp1_inner_module,
    fsdp2_unsharded_specs,
    global_module_hooks,
    global_module_hooks_limited_to,
    module_hook_dicts,
)
from .rerouted import (
    FLEX_MASK_BLOCK_SIZES,
    FLEX_MASK_FULL_KV_NUM_BLOCKS,
    FLEX_MASK_KV_NUM_BLOCKS,
    FLEX_MASK_LENGTHS,
    FLEX_MASK_MOD,
    TORCH_LINEAR,
    FlexKernel,
    NonReentrantRegion,
    checkpoint_routed_to,
    flex_attention_on_meta,
    meta_autocast_as_cpu,
    raised_by_meta_autocast,
    torch_linear,
)

__all__ = [
    "ASSERTION",
    "ATTENTION_BACKWARD",
    "ATTENTION_BACKWARD_NAMES",
    "ATTENTION_FORWARD",
    "ATTENTION_KERNEL_NAMES",
    "COMPILED_IN_PLACE",
    "COMPILED_ORIGINAL",
    "COMPILED_WRAPPER",
    "COMPOSABLE_STATE_KEY_PREFIX",
    "CONVOLUTION_KERNEL",
    "EXTRA_MATMULS",
    "FLEX_MASK_BLOCK_SIZES",
    "FLEX_MASK_FULL_KV_NUM_BLOCKS",
    "FLEX_MASK_KV_NUM_BLOCKS",
    "FLEX_MASK_LENGTHS",
    "FLEX_MASK_MOD",
    "FORWARD_HOOK_DICTS",
    "FSDP1_WRAPPER",
    "FUSED_ATTENTION",
    "FUSED_ATTENTION_NAMES",
    "FlattenedParameter",
    "FlexKernel",
    "HEADS_SECOND_TO_LAST",
    "NonReentrantRegion",
    "OTHER_HOOK_DICTS",
    "READ_SCALAR",
    "SYNCING_OPERATIONS",
    "TORCH_LINEAR",
    "TorchDispatchMode",
    "call_keywords",
    "checkpoint_routed_to",
    "current_autograd_node",
    "custom_function_forward",
    "dispatch_mode_stack",
    "flex_attention_on_meta",
    "fsdp1_flattened_parameters",
    "fsdp1_inner_module",
    "fsdp2_unsharded_specs",
    "global_module_hooks",
    "global_module_hooks_limited_to",
    "leave_dispatch_mode",
    "meta_autocast_as_cpu",
    "module_hook_dicts",
    "node_sequence_number",
    "profiler_running",
    "queue_backward_callback",
    "raised_by_meta_autocast",
    "torch_linear",
    "view_base",
    "wrapped_tensors",
]
