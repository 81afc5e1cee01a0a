"""Which dtype the matmuls run in: overrides, fp8 layers, autocast, stored weights and the TF32 rule."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mfu_callbacks.precision import (
    detect_compute_dtype,
    dtype_from_hf_args,
    dtype_from_lightning_precision,
    parse_compute_dtype,
)


@pytest.fixture(autouse=True)
def restore_matmul_precision() -> Iterator[None]:
    """Tests change torch's global FP32 matmul precision; put it back."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(device=device, dtype=dtype)


class Float8Linear(nn.Linear):
    """Stands in for torchao.float8.Float8Linear: recognised by class name only."""


class TransformerEngineLinear(nn.Linear):
    """Stands in for transformer_engine.pytorch.Linear: recognised by its module path only."""


TransformerEngineLinear.__module__ = "transformer_engine.pytorch.module.linear"


class Packed4bitLinear(nn.Module):
    """A bitsandbytes-style Linear4bit: packed uint8 weights, matmuls in ``compute_dtype``."""

    def __init__(self, packed_elements: int, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(packed_elements, dtype=torch.uint8), requires_grad=False)
        self.compute_dtype = compute_dtype


# -- stored weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "key"), [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float64, "fp64")]
)
def test_stored_weights_give_their_dtype(dtype: torch.dtype, key: str) -> None:
    assert detect_compute_dtype(mlp(dtype)) == key


def test_fp32_weights_follow_the_matmul_precision() -> None:
    model = mlp()
    assert detect_compute_dtype(model) == "fp32"
    torch.set_float32_matmul_precision("high")
    assert detect_compute_dtype(model) == "tf32"
    torch.set_float32_matmul_precision("medium")
    assert detect_compute_dtype(model) == "tf32"


def test_tf32_only_on_cuda_ampere_and_newer_when_a_device_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_float32_matmul_precision("high")
    model = mlp()
    assert detect_compute_dtype(model, device="cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert detect_compute_dtype(model, device=torch.device("cuda", 0)) == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert detect_compute_dtype(model, device=torch.device("cuda", 0)) == "tf32"
    assert detect_compute_dtype(model, device=0) == "tf32"


def test_the_per_backend_precision_api_is_read_too() -> None:
    """torch 2.9+ ``backends.cuda.matmul.fp32_precision`` makes the legacy getter raise; it still counts."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert detect_compute_dtype(mlp()) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert detect_compute_dtype(mlp()) == "fp32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"


def test_majority_by_element_count() -> None:
    model = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16), nn.LayerNorm(64))  # 4,160 bf16 vs 128 fp32
    assert detect_compute_dtype(model) == "bf16"
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(64, 64))  # 20 bf16 vs 4,160 fp32
    assert detect_compute_dtype(model) == "fp32"


def test_non_float_parameters_are_ignored() -> None:
    model = nn.Sequential(Packed4bitLinear(100_000, compute_dtype=None), nn.Linear(8, 8).to(torch.float16))
    assert detect_compute_dtype(model) == "fp16"


def test_packed_weights_count_at_their_compute_dtype() -> None:
    model = nn.Sequential(Packed4bitLinear(100_000, compute_dtype=torch.bfloat16), nn.Linear(8, 8))
    assert detect_compute_dtype(model) == "bf16"


def test_meta_device_weights_count() -> None:
    assert detect_compute_dtype(mlp(torch.bfloat16, device="meta")) == "bf16"


def test_a_model_without_float_parameters_is_fp32() -> None:
    assert detect_compute_dtype(nn.ReLU()) == "fp32"


# -- autocast, fp8 layers, overrides -----------------------------------------------------------------
def test_cpu_autocast_gives_its_dtype() -> None:
    model = mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert detect_compute_dtype(model) == "bf16"
        assert detect_compute_dtype(model, device="cpu") == "bf16"
    assert detect_compute_dtype(model) == "fp32"


def test_disabled_autocast_does_not_count() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert detect_compute_dtype(mlp()) == "fp32"


@pytest.mark.parametrize("layer", [Float8Linear, TransformerEngineLinear])
def test_fp8_layers_give_fp8(layer: type[nn.Linear]) -> None:
    model = nn.Sequential(nn.Linear(8, 8), layer(8, 8)).to(torch.bfloat16)
    assert detect_compute_dtype(model) == "fp8"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert detect_compute_dtype(model) == "fp8"


def test_a_class_merely_named_like_transformer_engine_is_not_fp8() -> None:
    class TransformerEngine(nn.Linear):
        pass

    assert detect_compute_dtype(nn.Sequential(TransformerEngine(4, 4))) == "fp32"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("bf16-mixed", "bf16"),
        ("bf16-true", "bf16"),
        ("16-mixed", "fp16"),
        ("16-true", "fp16"),
        ("fp8", "fp8"),
        ("transformer-engine", "fp8"),
        ("BF16", "bf16"),
        ("tf32", "tf32"),
        ("fp32", "fp32"),
        (16, "fp16"),
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
        (torch.float32, "fp32"),
        (torch.float8_e4m3fn, "fp8"),
        (torch.float8_e5m2, "fp8"),
    ],
)
def test_override_wins(override: str | int | torch.dtype, key: str) -> None:
    model = nn.Sequential(Float8Linear(8, 8)).to(torch.float16)  # would detect as fp8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert detect_compute_dtype(model, override=override) == key


def test_override_32_true_follows_the_matmul_precision() -> None:
    assert detect_compute_dtype(mlp(), override="32-true") == "fp32"
    torch.set_float32_matmul_precision("high")
    assert detect_compute_dtype(mlp(), override="32-true") == "tf32"
    assert detect_compute_dtype(mlp(), override="32-true", device="cpu") == "fp32"


@pytest.mark.parametrize("override", ["bf17", "int8", torch.int8, "", 3.5, True])
def test_bad_override_lists_the_accepted_values(override: object) -> None:
    with pytest.raises(ValueError) as raised:
        detect_compute_dtype(mlp(), override=override)
    message = str(raised.value)
    assert repr(override) in message
    assert "bf16-mixed" in message and "fp8" in message and "torch.bfloat16" in message


def test_parse_compute_dtype_is_what_the_peak_table_reads() -> None:
    assert parse_compute_dtype(torch.float8_e4m3fnuz) == "fp8"
    assert parse_compute_dtype("bfloat16") == "bf16"
    with pytest.raises(ValueError):
        parse_compute_dtype(torch.int32)


# -- framework settings ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("precision", "key"),
    [
        ("bf16-mixed", "bf16"),
        ("bf16-true", "bf16"),
        ("16-mixed", "fp16"),
        ("16-true", "fp16"),
        ("64-true", "fp64"),
        ("transformer-engine", "fp8"),
        ("32-true", "fp32"),
        ("no-such-precision", None),
    ],
)
def test_lightning_precision_strings(precision: str, key: str | None) -> None:
    assert dtype_from_lightning_precision(precision) == key


def test_lightning_32_true_is_tf32_when_torch_allows_it() -> None:
    torch.set_float32_matmul_precision("high")
    assert dtype_from_lightning_precision("32-true") == "tf32"


def test_hf_training_arguments() -> None:
    assert dtype_from_hf_args(bf16=True, fp16=False) == "bf16"
    assert dtype_from_hf_args(bf16=False, fp16=True) == "fp16"
    assert dtype_from_hf_args(bf16=False, fp16=False) is None
