"""An fp8 linear as torchao's ``Float8Linear`` runs one, for the fp8 tests: a custom autograd Function
whose forward casts the input and the weight to float8_e4m3fn with a scale and multiplies them with
``torch._scaled_mm``, and whose backward computes the input and weight gradients with ``_scaled_mm``
too (the gradient in float8_e5m2): three fp8 matmuls per linear. Tensorwise scaling keeps the fp8
casts for the backward (as torchao's tensorwise recipe does); rowwise scaling keeps the inputs and
casts them again along the axis each backward matmul needs (as its rowwise recipe does).

``Float8Tensor`` does what torchao's ``Float8TrainingTensor`` does: a tensor subclass that holds fp8
data and its scale and stands for the high-precision tensor; a plain ``torch.mm`` of two of them
runs ``_scaled_mm`` inside the subclass's dispatch, where a dispatch mode sees ``aten.mm`` of two
subclass tensors and never the ``_scaled_mm``. The ``"subclass"`` recipe multiplies through it.

``torch._scaled_mm`` runs on CPU in torch 2.13 (tensorwise and rowwise scales), and on the meta device.
"""

from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def to_fp8(tensor: torch.Tensor, dtype: torch.dtype, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` scaled into ``dtype``'s range, and the inverse scale ``_scaled_mm`` multiplies back:
    one scale for all (``keep`` None), or one per index of dimension ``keep`` (rowwise)."""
    magnitude = tensor.detach().abs().float()
    amax = magnitude.amax() if keep is None else magnitude.amax(dim=1 - keep, keepdim=True)
    scale = torch.finfo(dtype).max / amax.clamp(min=1e-12)
    limit = torch.finfo(dtype).max
    return (tensor.float() * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


def scaled_mm(
    a: torch.Tensor, b: torch.Tensor, rowwise: bool, out_dtype: torch.dtype, a_dtype: torch.dtype = E4M3
) -> torch.Tensor:
    """``a @ b`` in fp8: ``a`` (rows kept under rowwise scaling) in ``a_dtype``, ``b`` (columns kept) in e4m3."""
    a8, a_scale = to_fp8(a, a_dtype, 0 if rowwise else None)
    b8, b_scale = to_fp8(b, E4M3, 1 if rowwise else None)
    return torch._scaled_mm(a8, b8, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class Float8Tensor(torch.Tensor):
    """fp8 ``data`` times ``scale`` (the inverse scale), standing for a tensor of ``dtype``."""

    _data: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Float8Tensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), dtype=dtype, device=data.device
        )

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self._data, self._scale = data, scale

    def __repr__(self) -> str:
        return f"Float8Tensor({self._data.dtype}, shape={tuple(self.shape)})"

    def __tensor_flatten__(self):
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Float8Tensor(inner["_data"], inner["_scale"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is aten.mm.default:
            a, b = args
            return torch._scaled_mm(a._data, b._data, scale_a=a._scale, scale_b=b._scale, out_dtype=a.dtype)
        if func in (aten.t.default, aten.detach.default, aten.clone.default, aten.contiguous.default):
            tensor = args[0]
            return Float8Tensor(func(tensor._data, *args[1:], **(kwargs or {})), tensor._scale, tensor.dtype)
        raise NotImplementedError(f"Float8Tensor does not run {func}")


def float8_tensor(tensor: torch.Tensor, dtype: torch.dtype = E4M3) -> Float8Tensor:
    """``tensor`` cast to fp8 with one scale (tensorwise), as a ``Float8Tensor``."""
    data, scale = to_fp8(tensor, dtype, None)
    return Float8Tensor(data, scale, tensor.dtype)


class Float8SubclassMatmul(torch.autograd.Function):
    """``input @ weight.T`` with every product a ``torch.mm`` of two ``Float8Tensor`` (tensorwise), as
    torchao's ``matmul_with_hp_or_float8_args`` runs it."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, input.shape[-1])
        x8, w8 = float8_tensor(flat), float8_tensor(weight)
        ctx.save_for_backward(x8, w8)
        ctx.shape = input.shape
        return torch.mm(x8, w8.t()).reshape(*input.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, w8 = ctx.saved_tensors
        g8 = float8_tensor(grad.reshape(-1, grad.shape[-1]), E5M2)
        grad_input = torch.mm(g8, w8).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(g8.t().contiguous(), x8) if ctx.needs_input_grad[1] else None
        return grad_input, grad_weight


class Float8Matmul(torch.autograd.Function):
    """``input @ weight.T`` with every product in fp8."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, rowwise: bool) -> torch.Tensor:
        flat = input.reshape(-1, input.shape[-1])
        ctx.rowwise, ctx.shape = rowwise, input.shape
        if rowwise:
            out = scaled_mm(flat, weight.t(), True, input.dtype)
            ctx.save_for_backward(flat, weight)
        else:
            x8, x_scale = to_fp8(flat, E4M3, None)
            w8, w_scale = to_fp8(weight, E4M3, None)
            out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=input.dtype)
            ctx.save_for_backward(x8, x_scale, w8, w_scale)
        return out.reshape(*input.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat = grad.reshape(-1, grad.shape[-1])
        grad_input = grad_weight = None
        if ctx.rowwise:
            x, weight = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad_input = scaled_mm(flat, weight, True, grad.dtype, E5M2)
            if ctx.needs_input_grad[1]:
                grad_weight = scaled_mm(flat.t(), x, True, grad.dtype, E5M2)
        else:
            x8, x_scale, w8, w_scale = ctx.saved_tensors
            g8, g_scale = to_fp8(flat, E5M2, None)
            if ctx.needs_input_grad[0]:
                grad_input = torch._scaled_mm(g8, w8, scale_a=g_scale, scale_b=w_scale, out_dtype=grad.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = torch._scaled_mm(
                    g8.t().contiguous(), x8, scale_a=g_scale, scale_b=x_scale, out_dtype=grad.dtype
                )
        if grad_input is not None:
            grad_input = grad_input.reshape(ctx.shape)
        return grad_input, grad_weight, None


RECIPES = ("tensorwise", "rowwise", "subclass")


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmuls run in fp8 by ``recipe``: "tensorwise" or "rowwise" scaling
    (``Float8Matmul``), or "subclass" (tensorwise through ``Float8Tensor``: ``Float8SubclassMatmul``)."""

    recipe: str = "tensorwise"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.recipe == "subclass":
            out = Float8SubclassMatmul.apply(input, self.weight)
        else:
            out = Float8Matmul.apply(input, self.weight, self.recipe == "rowwise")
        return out if self.bias is None else out + self.bias


def convert_to_fp8(
    model: nn.Module, recipe: str = "tensorwise", *, skip: tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` but those named in ``skip`` runs in fp8 by ``recipe``, in place, with
    the same parameters (as torchao's ``convert_to_float8_training`` with a filter that keeps the head
    in bf16)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    for path, module in model.named_modules():
        if type(module) is nn.Linear and path.rpartition(".")[2] not in skip:
            module.__class__ = Float8Linear
            module.recipe = recipe
    return model


def convert_to_linear(model: nn.Module) -> nn.Module:
    """The fp8 twin's plain twin: every ``Float8Linear`` back to ``nn.Linear``, in place."""
    for module in model.modules():
        if isinstance(module, Float8Linear):
            module.__class__ = nn.Linear
            del module.recipe
    return model
