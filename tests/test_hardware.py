"""The dense peak table: device names as torch reports them, MIG slices, overrides and the unknown-device warning.

Expected figures are typed from the vendor datasheets (dense, not 2:4 sparse), not read back from the table.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from mfu_callbacks import hardware
from mfu_callbacks.hardware import PEAK_ENV_VAR, known_gpus, lookup_gpu, peak_flops, resolve_peak

T = 1e12


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """No peak from the environment, and every device may warn again."""
    monkeypatch.delenv(PEAK_ENV_VAR, raising=False)
    monkeypatch.setattr(hardware, "_warned_keys", set())


def fake_cuda(monkeypatch: pytest.MonkeyPatch, name: str, multiprocessors: int) -> None:
    """Make torch.cuda report one device of this name and multiprocessor count."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index=None: SimpleNamespace(multi_processor_count=multiprocessors),
    )


# Device names as torch.cuda.get_device_name() prints them, the row they are, and a dense figure.
DEVICE_NAMES = [
    ("Tesla V100-SXM2-16GB", "NVIDIA V100 SXM2", "fp16", 125),
    ("Tesla V100-SXM2-32GB", "NVIDIA V100 SXM2", "fp32", 15.7),
    ("Tesla V100-PCIE-32GB", "NVIDIA V100 PCIe", "fp16", 112),
    ("Tesla V100S-PCIE-32GB", "NVIDIA V100S PCIe", "fp16", 130),
    ("Tesla T4", "NVIDIA T4", "fp16", 65),
    ("NVIDIA A10", "NVIDIA A10", "bf16", 125),
    ("NVIDIA A10G", "NVIDIA A10G", "bf16", 70),
    ("NVIDIA A30", "NVIDIA A30", "bf16", 165),
    ("NVIDIA A40", "NVIDIA A40", "bf16", 149.7),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 SXM4 40GB", "bf16", 312),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM4 80GB", "tf32", 156),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 PCIe 40GB", "bf16", 312),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe 80GB", "bf16", 312),
    ("NVIDIA RTX A6000", "NVIDIA RTX A6000", "bf16", 154.8),
    ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090", "bf16", 71),
    ("NVIDIA L4", "NVIDIA L4", "fp8", 242.5),
    ("NVIDIA L40", "NVIDIA L40", "bf16", 181.05),
    ("NVIDIA L40S", "NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", "bf16", 989.4),
    ("NVIDIA H100 SXM5 80GB", "NVIDIA H100 SXM", "fp8", 1978.9),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", "NVIDIA H200 SXM", "bf16", 989.4),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA H20", "NVIDIA H20", "bf16", 148),
    ("NVIDIA GH200 480GB", "NVIDIA GH200", "bf16", 989.4),
    ("NVIDIA GH200 144G HBM3e", "NVIDIA GH200", "fp8", 1978.9),
    ("NVIDIA B200", "NVIDIA B200", "bf16", 2250),
    ("NVIDIA GB200", "NVIDIA GB200", "bf16", 2500),
    ("NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 5090", "bf16", 209.5),
    ("AMD Instinct MI250X", "AMD Instinct MI250X", "bf16", 191.5),
    ("AMD Instinct MI300X", "AMD Instinct MI300X", "bf16", 1307.4),
    ("AMD Instinct MI300X VF", "AMD Instinct MI300X", "fp8", 2614.9),
    ("AMD Instinct MI325X", "AMD Instinct MI325X", "bf16", 1307.4),
    # other spellings: case, no vendor prefix, trademark signs
    ("nvidia h100 80gb hbm3", "NVIDIA H100 SXM", "bf16", 989.4),
    ("H100 PCIe", "NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA A100-SXM-80GB", "NVIDIA A100 SXM4 80GB", "bf16", 312),
    ("AMD Instinct(TM) MI300X", "AMD Instinct MI300X", "bf16", 1307.4),
]


@pytest.mark.parametrize(("device_name", "row", "dtype", "tflops"), DEVICE_NAMES)
def test_device_names_find_their_row_and_dense_figure(
    device_name: str, row: str, dtype: str, tflops: float
) -> None:
    assert lookup_gpu(device_name).name == row
    assert peak_flops(device_name, dtype) == pytest.approx(tflops * T, rel=1e-12)


def test_every_row_is_reached_by_a_device_name_and_by_its_canonical_name() -> None:
    reached = {lookup_gpu(name).name for name, *_ in DEVICE_NAMES} | {"AMD Instinct MI250"}
    assert reached == set(known_gpus())
    for name in known_gpus():
        assert lookup_gpu(name).name == name
        row = lookup_gpu(name)
        assert peak_flops(name, "fp16") == pytest.approx(row.fp16 * T)


def test_every_row_names_its_datasheet_and_has_dense_figures_in_order() -> None:
    for row in hardware.PEAK_TABLE:
        assert row.source and any(
            word in row.source
            for word in ("datasheet", "data sheet", "whitepaper", "brief", "specifications")
        )
        assert row.fp32 is not None and row.fp16 is not None
        # Tensor-core fp16 is at least the fp32 rate, fp8 at least fp16: catches a transposed or sparse figure.
        assert row.fp16 >= row.fp32
        if row.fp8 is not None:
            assert row.fp8 >= row.fp16


def test_h100_sxm_bf16_is_the_dense_anchor() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float16) == 989.4e12


def test_h200_has_the_h100_sxm_matrix_rate() -> None:
    for dtype in ("tf32", "bf16", "fp16", "fp8"):
        assert peak_flops("NVIDIA H200", dtype) == peak_flops("NVIDIA H100 80GB HBM3", dtype)


def test_h100_nvl_is_dense_per_gpu_not_the_sparse_figure() -> None:
    nvl = peak_flops("NVIDIA H100 NVL", "bf16")
    assert nvl == pytest.approx(835.5 * T)
    assert nvl < peak_flops("NVIDIA H100 80GB HBM3", "bf16") < 1979 * T


def test_anchors_from_measurements() -> None:
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756 * T)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312 * T)


@pytest.mark.parametrize(
    ("device_name", "dtype"),
    [
        ("NVIDIA A100-SXM4-80GB", "fp8"),
        ("NVIDIA A100-SXM4-80GB", torch.float8_e4m3fn),
        ("Tesla V100-SXM2-32GB", "bf16"),
        ("Tesla T4", torch.bfloat16),
        ("AMD Instinct MI250X", "fp8"),
        ("NVIDIA H100 80GB HBM3", torch.float64),
    ],
)
def test_a_dtype_the_chip_lacks_has_no_peak(device_name: str, dtype: str | torch.dtype) -> None:
    assert peak_flops(device_name, dtype) is None


def test_tf32_on_a_chip_without_tf32_units_is_the_fp32_rate() -> None:
    assert peak_flops("Tesla V100-SXM2-32GB", "tf32") == pytest.approx(15.7 * T)
    assert peak_flops("AMD Instinct MI250X", "tf32") == pytest.approx(47.85 * T)


def test_torch_dtypes_map_to_the_table_keys() -> None:
    name = "NVIDIA H100 80GB HBM3"
    assert peak_flops(name, torch.float32) == pytest.approx(67 * T)
    assert peak_flops(name, torch.float8_e4m3fn) == pytest.approx(1978.9 * T)
    assert peak_flops(name, torch.float8_e5m2) == pytest.approx(1978.9 * T)
    with pytest.raises(ValueError, match="bf16"):
        peak_flops(name, "int4")


@pytest.mark.parametrize(
    "device_name",
    [
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA H800",
        "AMD Instinct MI300A",
        "Tesla V100",
    ],
)
def test_names_outside_the_table_have_no_peak(device_name: str) -> None:
    assert peak_flops(device_name, "bf16") is None


# -- multiprocessors ---------------------------------------------------------------------------------
def test_multiprocessor_count_decides_an_ambiguous_name() -> None:
    assert peak_flops("NVIDIA H100", "bf16") is None  # SXM or PCIe: never guessed
    assert peak_flops("NVIDIA H100", "bf16", multiprocessors=132) == pytest.approx(989.4 * T)
    assert peak_flops("NVIDIA H100", "bf16", multiprocessors=114) == pytest.approx(756 * T)
    assert peak_flops("AMD Instinct MI250X/MI250", "bf16") is None
    assert peak_flops("AMD Instinct MI250X/MI250", "bf16", multiprocessors=110) == pytest.approx(191.5 * T)
    assert peak_flops("AMD Instinct MI250X/MI250", "bf16", multiprocessors=104) == pytest.approx(181.05 * T)


def test_an_ambiguous_name_whose_rows_agree_has_their_peak() -> None:
    assert peak_flops("NVIDIA A100", "bf16") == pytest.approx(312 * T)


def test_a_multiprocessor_count_that_fits_no_row_has_no_peak() -> None:
    """A cut-down chip under a known name, or an AMD partition of a few CUs, is not the full chip."""
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16", multiprocessors=114) is None
    assert peak_flops("AMD Instinct MI300X", "bf16", multiprocessors=38) is None


# -- MIG ---------------------------------------------------------------------------------------------
def test_mig_slice_scales_by_its_compute_slices() -> None:
    assert peak_flops("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16") == pytest.approx(312 * T * 3 / 7)
    assert peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16") == pytest.approx(989.4 * T / 7)
    assert peak_flops("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", "bf16") == pytest.approx(989.4 * T / 7)
    assert peak_flops("NVIDIA A30 MIG 2g.12gb", "bf16") == pytest.approx(
        165 * T * 2 / 4
    )  # the A30 has 4 slices


def test_mig_slice_scales_by_its_multiprocessors_when_known() -> None:
    assert peak_flops("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16", multiprocessors=42) == pytest.approx(
        312 * T * 42 / 108
    )
    assert peak_flops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", multiprocessors=16) == pytest.approx(
        989.4 * T * 16 / 132
    )


def test_mig_slice_of_a_real_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 42)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == pytest.approx(312 * T * 42 / 108)


# -- devices -----------------------------------------------------------------------------------------
def test_a_cuda_device_is_read_through_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, "NVIDIA H100 PCIe", 114)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == pytest.approx(756 * T)
    assert peak_flops(0, "bf16") == pytest.approx(756 * T)
    assert peak_flops("cuda:0", "bf16") == pytest.approx(756 * T)


def test_the_device_multiprocessor_count_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, "NVIDIA H100", 114)
    assert peak_flops(torch.device("cuda"), "bf16") == pytest.approx(756 * T)


def test_cpu_has_no_peak() -> None:
    assert peak_flops(torch.device("cpu"), "fp32") is None
    assert peak_flops("cpu", "fp32") is None


# -- resolve_peak --------------------------------------------------------------------------------------
def test_resolve_peak_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 132)
    peak = resolve_peak(torch.device("cuda", 0), torch.bfloat16)
    assert peak.flops == 989.4e12
    assert peak.tflops == pytest.approx(989.4)
    assert peak.device_name == "NVIDIA H100 80GB HBM3"
    assert peak.dtype == "bf16"
    assert "H100" in peak.source and "datasheet" in peak.source


def test_override_argument_beats_environment_and_table(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 132)
    monkeypatch.setenv(PEAK_ENV_VAR, "123.5")
    peak = resolve_peak(torch.device("cuda", 0), "bf16", override_tflops=500)
    assert (peak.flops, peak.source) == (500e12, "override argument")


def test_environment_beats_table(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 132)
    monkeypatch.setenv(PEAK_ENV_VAR, " 123.5 ")
    peak = resolve_peak(torch.device("cuda", 0), "bf16")
    assert (peak.flops, peak.source, peak.device_name) == (123.5e12, PEAK_ENV_VAR, "NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("value", ["fast", "0", "-3", "nan", "inf", "989.4 TFLOPS"])
def test_bad_environment_value_raises_naming_variable_value_and_form(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    fake_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", 132)
    monkeypatch.setenv(PEAK_ENV_VAR, value)
    with pytest.raises(ValueError) as raised:
        resolve_peak(torch.device("cuda", 0), "bf16")
    message = str(raised.value)
    assert PEAK_ENV_VAR in message and repr(value) in message and "positive number" in message


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "989", True])
def test_bad_override_argument_raises(value: object) -> None:
    with pytest.raises(ValueError, match="peak_tflops"):
        resolve_peak(torch.device("cpu"), "bf16", override_tflops=value)


def test_unknown_device_warns_once_and_has_no_peak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mfu_callbacks")
    assert resolve_peak("Imaginary Accelerator X1", "bf16") is None
    assert resolve_peak("Imaginary Accelerator X1", "bf16") is None
    assert resolve_peak("Imaginary Accelerator X1", "fp16") is None
    warnings = [record for record in caplog.records if record.name == "mfu_callbacks"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "Imaginary Accelerator X1" in message
    assert "peak_tflops=" in message and PEAK_ENV_VAR in message


def test_each_unknown_device_warns_for_itself(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="mfu_callbacks")
    fake_cuda(monkeypatch, "NVIDIA Imaginary 9000", 7)
    assert resolve_peak(torch.device("cuda", 0), "bf16") is None
    assert resolve_peak("Imaginary Accelerator X2", "bf16") is None
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "NVIDIA Imaginary 9000" in messages[0] and "Imaginary Accelerator X2" in messages[1]


def test_a_dtype_the_chip_lacks_warns_once_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mfu_callbacks")
    assert resolve_peak("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert resolve_peak("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert len(caplog.records) == 1
    assert "fp8" in caplog.records[0].getMessage()


def test_cpu_resolves_to_none_silently_unless_overridden(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="mfu_callbacks")
    assert resolve_peak(torch.device("cpu"), "fp32") is None
    assert caplog.records == []
    peak = resolve_peak(torch.device("cpu"), "fp32", override_tflops=1.5)
    assert (peak.flops, peak.device_name, peak.source) == (1.5e12, "cpu", "override argument")
    monkeypatch.setenv(PEAK_ENV_VAR, "2")
    assert resolve_peak(torch.device("cpu"), "fp32").flops == 2e12


# -- CLI short names -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("short", "row"),
    [
        ("h100", "NVIDIA H100 SXM"),
        ("H100", "NVIDIA H100 SXM"),
        ("h100-sxm", "NVIDIA H100 SXM"),
        ("h100-pcie", "NVIDIA H100 PCIe"),
        ("h100_nvl", "NVIDIA H100 NVL"),
        ("h200", "NVIDIA H200 SXM"),
        ("h200-nvl", "NVIDIA H200 NVL"),
        ("a100", "NVIDIA A100 SXM4 80GB"),
        ("a100-40gb", "NVIDIA A100 SXM4 40GB"),
        ("a100-pcie", "NVIDIA A100 PCIe 80GB"),
        ("a10", "NVIDIA A10"),
        ("a10g", "NVIDIA A10G"),
        ("mi300x", "AMD Instinct MI300X"),
        ("MI325X", "AMD Instinct MI325X"),
        ("4090", "NVIDIA GeForce RTX 4090"),
        ("rtx-3090", "NVIDIA GeForce RTX 3090"),
        ("l40s", "NVIDIA L40S"),
        ("gh200", "NVIDIA GH200"),
        ("b200", "NVIDIA B200"),
        ("v100", "NVIDIA V100 SXM2"),
    ],
)
def test_short_names_for_the_cli(short: str, row: str) -> None:
    assert lookup_gpu(short).name == row


def test_short_names_are_unique_and_unknown_ones_miss() -> None:
    owners: dict[str, set[str]] = {}
    for row in hardware.PEAK_TABLE:
        for name in (row.name, *row.aliases):
            owners.setdefault(hardware._compact(name), set()).add(row.name)
    assert {short: rows for short, rows in owners.items() if len(rows) > 1} == {}
    assert lookup_gpu("h300") is None
    assert lookup_gpu("NVIDIA H100 80GB") is None  # a device name that fits the SXM and the PCIe card
