"""Which dtype the matmuls run in: it picks the column of the peak table that MFU divides by.

The answer is one of the keys of that table: "fp32", "tf32", "bf16", "fp16", "fp8" (and "fp64",
which the table has no column for, so MFU is left out rather than measured against a wrong peak).
Detection order: an explicit override, then fp8 layers in the model, then an autocast region that
is active now, then the dtype that most of the model's floating-point weights are stored in.
Only torch is imported: fp8 layers are recognised by their class, never by importing their package.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

COMPUTE_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
"""The dtype keys of the peak table."""

_FP32_RULE = (
    "fp32-or-tf32"  # "32-true": fp32 weights, matmuls in TF32 when torch allows it (see _fp32_matmul_key)
)

_TORCH_DTYPE_KEYS: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    **{
        getattr(torch, name): "fp8"
        for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, name)
    },
}

# Lightning's precision strings (``Trainer(precision=...)``, including its legacy short forms).
_LIGHTNING_PRECISION_KEYS: dict[str, str] = {
    "bf16-mixed": "bf16",
    "bf16-true": "bf16",
    "bf16": "bf16",
    "16-mixed": "fp16",
    "16-true": "fp16",
    "16": "fp16",
    "32-true": _FP32_RULE,
    "32": _FP32_RULE,
    "64-true": "fp64",
    "64": "fp64",
    "transformer-engine": "fp8",
    "transformer-engine-float16": "fp8",
}

# Every string an override may be: the table keys, torch's dtype names, and Lightning's strings.
_OVERRIDE_KEYS: dict[str, str] = {
    **{key: key for key in (*COMPUTE_DTYPES, "fp64")},
    "float32": "fp32",
    "float64": "fp64",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    **_LIGHTNING_PRECISION_KEYS,
}


def parse_compute_dtype(
    value: torch.dtype | str | int, *, device: torch.device | str | int | None = None
) -> str:
    """The table key for a dtype given as a torch dtype, a key, or a Lightning precision string.

    "32-true" (fp32 weights) resolves to "tf32" or "fp32" by the matmul-precision rule of
    :func:`detect_compute_dtype`; ``torch.float32`` and "fp32" mean FP32 matmuls, as written.
    Raises ValueError for anything else, listing what is accepted.
    """
    if isinstance(value, torch.dtype):
        if value in _TORCH_DTYPE_KEYS:
            return _TORCH_DTYPE_KEYS[value]
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        key = _OVERRIDE_KEYS.get(str(value).strip().lower())
        if key == _FP32_RULE:
            return _fp32_matmul_key(device)
        if key is not None:
            return key
    accepted = ", ".join(sorted(_OVERRIDE_KEYS))
    raise ValueError(
        f"unknown compute dtype {value!r}: expected a floating-point torch dtype "
        f"(torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, ...) or one of: {accepted}"
    )


def detect_compute_dtype(
    model: nn.Module,
    *,
    override: torch.dtype | str | int | None = None,
    device: torch.device | str | int | None = None,
    fp8_layers: bool = True,
) -> str:
    """The dtype key the model's matmuls run in, for picking the peak.

    Order: ``override`` (a torch dtype, a key, or a Lightning precision string such as
    "bf16-mixed"); "fp8" when the model holds Transformer Engine layers or torchao Float8Linear
    layers; the autocast dtype when autocast is active now; else the dtype of most floating-point
    weights by element count (non-float weights, such as packed 4-bit ones, count at the
    ``compute_dtype`` their module declares, or not at all). FP32 weights give "tf32" when
    ``torch.get_float32_matmul_precision()`` is not "highest" (and, when ``device`` is given, it is
    a CUDA device of compute capability 8.0 or newer), else "fp32". ``fp8_layers=False`` skips the
    fp8 layers: the dtype of the matmuls that do not run in fp8 (attention, the head).
    """
    if override is not None:
        return parse_compute_dtype(override, device=device)
    if fp8_layers and _has_fp8_layers(model):
        return "fp8"
    autocast_key = active_autocast_dtype(device)
    if autocast_key is not None:
        return autocast_key
    stored = _majority_float_dtype(model)
    if stored is None or stored == torch.float32:
        return _fp32_matmul_key(device)
    return _TORCH_DTYPE_KEYS.get(stored, "fp32")


def dtype_from_lightning_precision(precision: str) -> str | None:
    """The dtype key for a Lightning ``trainer.precision`` string; None for one it does not know.

    "32-true" follows the matmul-precision rule ("tf32" unless the precision is "highest"); the
    peak table answers FP32 for "tf32" on chips without TF32 units, so no device is needed here.
    """
    key = _LIGHTNING_PRECISION_KEYS.get(str(precision).strip().lower())
    if key == _FP32_RULE:
        return _fp32_matmul_key(None)
    return key


def dtype_from_hf_args(bf16: bool, fp16: bool) -> str | None:
    """The dtype key for Hugging Face ``TrainingArguments(bf16=..., fp16=...)``; None when neither is set."""
    if bf16:
        return "bf16"
    if fp16:
        return "fp16"
    return None


def tf32_matmuls_allowed() -> bool:
    """Whether torch lets FP32 matmuls run in TF32 (``set_float32_matmul_precision`` "high" or "medium").

    Reads the legacy setting; when the per-backend API of torch 2.9+ was used (which makes the
    legacy getter raise), reads ``torch.backends.cuda.matmul.fp32_precision`` instead.
    """
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"


def _fp32_matmul_key(device: torch.device | str | int | None) -> str:
    """Give "tf32" when FP32 matmuls may use TF32 tensor cores (compute capability 8.0 and newer), else "fp32"."""
    if not tf32_matmuls_allowed():
        return "fp32"
    if device is None:
        return "tf32"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "tf32" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"


def _has_fp8_layers(model: nn.Module) -> bool:
    """Transformer Engine modules or torchao Float8Linear layers, known by class so neither package is imported."""
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("transformer_engine") or "Float8Linear" in cls.__name__:
            return True
    return False


def active_autocast_dtype(device: torch.device | str | int | None) -> str | None:
    """The dtype key ("bf16"/"fp16") of an autocast region active now, the model's device type first; None without one."""
    device_types = ["cuda", "cpu"]
    if device is not None and not isinstance(device, int):
        device_types.insert(0, torch.device(device).type)
    for device_type in dict.fromkeys(device_types):
        try:
            if torch.is_autocast_enabled(device_type):
                key = _TORCH_DTYPE_KEYS.get(torch.get_autocast_dtype(device_type))
                if key in ("bf16", "fp16"):
                    return key
        except RuntimeError:  # a device type autocast does not support
            continue
    return None


def _majority_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating-point dtype holding the most parameter elements (meta tensors count too)."""
    elements: Counter[torch.dtype] = Counter()
    for parameter in model.parameters():
        if parameter.is_floating_point():
            elements[parameter.dtype] += parameter.numel()
    for module in model.modules():
        # Packed quantized weights (bitsandbytes Linear4bit) are dequantized to the module's compute dtype.
        weight, compute_dtype = getattr(module, "weight", None), getattr(module, "compute_dtype", None)
        if (
            isinstance(weight, torch.Tensor)
            and not weight.is_floating_point()
            and isinstance(compute_dtype, torch.dtype)
            and compute_dtype.is_floating_point
        ):
            elements[compute_dtype] += weight.numel()
    if not elements:
        return None
    return elements.most_common(1)[0][0]


class AutocastWatch:
    """Sees, at the model's first forward, whether autocast is on and in which dtype.

    Autocast is entered around the forward, after the meter is built, so the dtype the matmuls run
    in is known only then. The hook removes itself after one call and never changes the forward.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        on_first_forward: Callable[[nn.Module], None] | None = None,
    ) -> None:
        self.dtype: str | None = None  # autocast's dtype key at the first forward; None without autocast
        self.seen = False
        self._device = device
        self._on_first_forward = on_first_forward
        self._handle: RemovableHandle | None = model.register_forward_pre_hook(self._first_forward)

    @property
    def enabled_at_first_forward(self) -> bool | None:
        """Whether autocast was on at the first forward; None before any forward."""
        return self.dtype is not None if self.seen else None

    @torch.compiler.disable
    def _first_forward(self, module: nn.Module, args: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.seen = True
        self.dtype = active_autocast_dtype(self._device)
        if self._on_first_forward is not None:
            with suppress(Exception):  # a failed look keeps what was found at construction
                self._on_first_forward(module)
