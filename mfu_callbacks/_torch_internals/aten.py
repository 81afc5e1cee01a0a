"""Internal aten kernels, by name: the ops a trace or an observer tells apart (scalar reads, fused
attention and its backward, grouped and scaled matmuls)."""

from __future__ import annotations

import torch

_aten = torch.ops.aten

# -- aten kernels ----------------------------------------------------------------------------------
READ_SCALAR = (
    _aten._local_scalar_dense.default
)  # a value read back to Python: .item(), bool(tensor), `x in tensor`
# Operations, by name, that wait for the device to read a value back to the host.
SYNCING_OPERATIONS = frozenset(
    {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.scalar_tensor"}
)
# The reduction behind torch._check_tensor_all (transformers' ``torch_compilable_check``): an assertion
# about the data, e.g. that a VLM's image tokens match its image features, whose value is then read.
ASSERTION = _aten._is_all_true.default
CONVOLUTION_KERNEL = (
    _aten._convolution.default
)  # the kernel behind aten.convolution; same first nine arguments
# Matmul kernels a real step may run besides mm/bmm (MoE grouped GEMMs, fp8): their packets.
EXTRA_MATMULS = tuple(
    getattr(_aten, name)
    for name in ("_grouped_mm", "_scaled_mm", "_scaled_grouped_mm")
    if hasattr(_aten, name)
)
# Fused attention kernels (query, key, value first). On the meta device SDPA decomposes into bmm
# today; these count it should a fused kernel be dispatched instead.
FUSED_ATTENTION_NAMES = (
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
)


def _overloads(names: tuple[str, ...]) -> frozenset:
    return frozenset(
        getattr(packet, overload)
        for packet in (getattr(_aten, name) for name in names if hasattr(_aten, name))
        for overload in packet.overloads()
    )


FUSED_ATTENTION = _overloads(FUSED_ATTENTION_NAMES)
# What a real step may run besides: the kernels under SDPA on CUDA, called directly by some models
# (layout [batch, length, heads, dim], or [tokens, heads, dim] for variable lengths), and every
# attention backward kernel (grad_output first, then query, key, value).
ATTENTION_KERNEL_NAMES = ("_flash_attention_forward", "_efficient_attention_forward")
ATTENTION_BACKWARD_NAMES = (
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_backward",
    "_efficient_attention_backward",
)
ATTENTION_FORWARD = FUSED_ATTENTION | _overloads(ATTENTION_KERNEL_NAMES)
ATTENTION_BACKWARD = _overloads(ATTENTION_BACKWARD_NAMES)
HEADS_SECOND_TO_LAST = _overloads(ATTENTION_KERNEL_NAMES + ATTENTION_BACKWARD_NAMES[4:])
