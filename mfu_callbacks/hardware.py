"""Dense peak FLOP/s per GPU, per dtype: the denominator of MFU.

The table is data: one :class:`GpuSpec` row per chip, with the dense (not 2:4-sparse) datasheet
figures in TFLOP/s and the datasheet they come from. Datasheets often print the sparse figure
first; where a row says "sparse figures halved", the dense figure is half the printed one.
GeForce figures are the whitepapers' dense BF16/FP16 rates with FP32 accumulate (what PyTorch's
GEMMs use), which on those cards is half the FP16-accumulate rate.

A device the table does not know gets no peak: MFU is then left out (after one warning naming
the ways to give the peak), never measured against a guessed one.

    peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)   # 989.4e12
    resolve_peak(torch.device("cuda", 0), "bf16")          # PeakInfo(flops=..., source=...)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields, replace

import torch

from . import _validate
from ._validate import PEAK_ENV_VAR
from .precision import COMPUTE_DTYPES, parse_compute_dtype

logger = logging.getLogger("mfu_callbacks")

_DEFAULT_MIG_SLICES = 7  # compute slices of a full chip (A100, H100, H200, B200); the A30 has 4
_VENDOR_WORDS = frozenset({"nvidia", "amd", "tesla", "instinct", "geforce", "radeon"})
_HOST_DEVICE_TYPES = frozenset({"cpu", "meta"})
_DEVICE_SPEC = re.compile(r"^(cpu|cuda|meta|mps|xpu|hpu|privateuseone)(:\d+)?$")
_MIG_PROFILE = re.compile(r"\bmig\b\s*(?:(\d+)c\.)?(\d+)g\.")  # "MIG 3g.20gb", "MIG 1c.3g.40gb"


@dataclass(frozen=True)
class GpuSpec:
    """One chip: its dense peak TFLOP/s per dtype key (None where it lacks the dtype) and how torch names it.

    ``patterns`` are regular expressions searched in the normalised device name (lower case, no
    vendor words such as "NVIDIA" or "Tesla", hyphens as spaces). ``multiprocessors`` (SMs, or
    CUs on AMD) tells apart chips that share a name and scales MIG slices; ``mig_slices`` is the
    number of compute slices of the full chip where it supports MIG. ``aliases`` are short names
    for the CLI beyond the canonical name, which matches without vendor words and punctuation
    ("h100-pcie" is "NVIDIA H100 PCIe").
    """

    name: str
    patterns: tuple[str, ...]
    source: str
    fp32: float | None = None
    tf32: float | None = None
    bf16: float | None = None
    fp16: float | None = None
    fp8: float | None = None
    multiprocessors: int | None = None
    mig_slices: int | None = None
    aliases: tuple[str, ...] = ()

    def dense_tflops(self, dtype: str) -> float | None:
        """Dense peak TFLOP/s for a dtype key; None where the chip lacks it.

        FP32 matmuls that torch allows to use TF32 run at the FP32 rate on chips without TF32
        units (V100, T4, MI250X), so "tf32" falls back to "fp32" there.
        """
        if dtype not in COMPUTE_DTYPES:
            return None
        value = getattr(self, dtype)
        if value is None and dtype == "tf32":
            return self.fp32
        return value


@dataclass(frozen=True)
class PeakInfo:
    """The peak MFU divides by: FLOP/s of one GPU at the dtype key, and where the figure came from.

    ``table``: the same GPU's dense FLOP/s at every dtype the peak table has a figure for, as
    (dtype, FLOP/s) pairs, when the peak came from the table (empty for a peak given by hand): the
    peaks of a step whose matmuls run in several dtypes (``at``).
    """

    flops: float
    device_name: str
    dtype: str
    source: str
    table: tuple[tuple[str, float], ...] = ()

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def at(self, dtype: str) -> PeakInfo | None:
        """The same GPU's peak at another dtype key; None where the table has no figure (or the peak
        was given by hand: it holds for one dtype only)."""
        if dtype == self.dtype:
            return self
        flops = dict(self.table).get(dtype)
        return replace(self, flops=flops, dtype=dtype) if flops is not None else None


# fmt: off
PEAK_TABLE: tuple[GpuSpec, ...] = (
    # -- NVIDIA Volta, Turing ---------------------------------------------------------------------
    GpuSpec(
        name="NVIDIA V100 SXM2", fp32=15.7, fp16=125.0, multiprocessors=80,
        patterns=(r"^v100\b.*\b(sxm\d?|dgxs)\b",), aliases=("v100", "v100-sxm"),
        source="NVIDIA V100 Tensor Core GPU datasheet (2020), SXM2 column; no sparsity on Volta",
    ),
    GpuSpec(
        name="NVIDIA V100 PCIe", fp32=14.0, fp16=112.0, multiprocessors=80,
        patterns=(r"^v100\b.*\bpcie\b",),
        source="NVIDIA V100 Tensor Core GPU datasheet (2020), PCIe column",
    ),
    GpuSpec(
        name="NVIDIA V100S PCIe", fp32=16.4, fp16=130.0, multiprocessors=80,
        patterns=(r"^v100s\b",), aliases=("v100s",),
        source="NVIDIA V100 Tensor Core GPU datasheet (2020), V100S PCIe column",
    ),
    GpuSpec(
        name="NVIDIA T4", fp32=8.1, fp16=65.0, multiprocessors=40,
        patterns=(r"^t4g?$",),
        source="NVIDIA T4 Tensor Core GPU datasheet (2019): FP16 mixed precision 65 TFLOPS, dense",
    ),
    # -- NVIDIA Ampere ------------------------------------------------------------------------------
    GpuSpec(
        name="NVIDIA A10", fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0, multiprocessors=72,
        patterns=(r"^a10\b",),
        source="NVIDIA A10 Tensor Core GPU datasheet (2021), sparse figures halved",
    ),
    GpuSpec(
        # AWS's variant of the A10: 80 SMs with half-rate FP32-accumulate tensor math.
        name="NVIDIA A10G", fp32=35.0, tf32=35.0, bf16=70.0, fp16=70.0, multiprocessors=80,
        patterns=(r"^a10g\b",),
        source="AWS EC2 G5 instance specifications (2021) for the A10G; NVIDIA publishes no A10G datasheet",
    ),
    GpuSpec(
        name="NVIDIA A30", fp32=10.3, tf32=82.0, bf16=165.0, fp16=165.0, multiprocessors=56, mig_slices=4,
        patterns=(r"^a30\b",),
        source="NVIDIA A30 Tensor Core GPU datasheet (2021), sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA A40", fp32=37.4, tf32=74.8, bf16=149.7, fp16=149.7, multiprocessors=84,
        patterns=(r"^a40\b",),
        source="NVIDIA A40 datasheet (2020), sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA A100 SXM4 40GB", fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0,
        multiprocessors=108, mig_slices=7,
        patterns=(r"^a100\b(?=.*\bsxm\w*)(?=.*\b40gb\b)", r"^a100( 40gb)?$"),
        aliases=("a100-40gb", "a100-sxm-40gb"),
        source="NVIDIA A100 Tensor Core GPU datasheet (2021), SXM column (dense figures printed first)",
    ),
    GpuSpec(
        name="NVIDIA A100 SXM4 80GB", fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0,
        multiprocessors=108, mig_slices=7,
        patterns=(r"^a100\b(?=.*\bsxm\w*)(?=.*\b80gb\b)", r"^a100( 80gb)?$"),
        aliases=("a100", "a100-80gb", "a100-sxm", "a100-sxm4", "a100-sxm-80gb"),
        source="NVIDIA A100 Tensor Core GPU datasheet (2021), SXM column (dense figures printed first)",
    ),
    GpuSpec(
        name="NVIDIA A100 PCIe 40GB", fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0,
        multiprocessors=108, mig_slices=7,
        patterns=(r"^a100\b(?=.*\bpcie\b)(?=.*\b40gb\b)", r"^a100( 40gb)?$"),
        source="NVIDIA A100 Tensor Core GPU datasheet (2021), PCIe column (dense figures printed first)",
    ),
    GpuSpec(
        name="NVIDIA A100 PCIe 80GB", fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0,
        multiprocessors=108, mig_slices=7,
        patterns=(r"^a100\b(?=.*\bpcie\b)(?=.*\b80gb\b)", r"^a100( 80gb)?$"),
        aliases=("a100-pcie",),
        source="NVIDIA A100 Tensor Core GPU datasheet (2021), PCIe column (dense figures printed first)",
    ),
    GpuSpec(
        name="NVIDIA RTX A6000", fp32=38.7, tf32=77.4, bf16=154.8, fp16=154.8, multiprocessors=84,
        patterns=(r"^rtx a6000$",), aliases=("a6000",),
        source="NVIDIA RTX A6000 datasheet (2021): tensor 309.7 TFLOPS sparse, halved; TF32 from the "
               "NVIDIA Ampere GA102 GPU architecture whitepaper v2 (2021)",
    ),
    GpuSpec(
        name="NVIDIA GeForce RTX 3090", fp32=35.6, tf32=35.6, bf16=71.0, fp16=71.0, multiprocessors=82,
        patterns=(r"^rtx 3090$",), aliases=("3090",),
        source="NVIDIA Ampere GA102 GPU architecture whitepaper v2 (2021), RTX 3090: dense BF16/FP16 "
               "with FP32 accumulate",
    ),
    # -- NVIDIA Ada Lovelace ------------------------------------------------------------------------
    GpuSpec(
        name="NVIDIA L4", fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0, fp8=242.5, multiprocessors=58,
        patterns=(r"^l4\b",),
        source="NVIDIA L4 Tensor Core GPU datasheet (2023), sparse figures halved",
    ),
    GpuSpec(
        # FP16/BF16 with FP32 accumulate run at half the FP16-accumulate rate on the L40 (not on the L40S).
        name="NVIDIA L40", fp32=90.5, tf32=90.5, bf16=181.05, fp16=181.05, fp8=362.0, multiprocessors=142,
        patterns=(r"^l40\b",),
        source="NVIDIA L40 GPU datasheet (2022), sparse figures halved, FP16/BF16 with FP32 accumulate",
    ),
    GpuSpec(
        name="NVIDIA L40S", fp32=91.6, tf32=183.0, bf16=362.05, fp16=362.05, fp8=733.0, multiprocessors=142,
        patterns=(r"^l40s\b",),
        source="NVIDIA L40S GPU datasheet (2023), sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA GeForce RTX 4090", fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3,
        multiprocessors=128,
        patterns=(r"^rtx 4090$",), aliases=("4090",),
        source="NVIDIA Ada Lovelace GPU architecture whitepaper v2.1 (2023), RTX 4090: dense BF16/FP16/FP8 "
               "with FP32 accumulate",
    ),
    # -- NVIDIA Hopper ------------------------------------------------------------------------------
    GpuSpec(
        # Dense BF16 = 132 SMs x 1,830 MHz x 4,096 FLOP per SM per clock = 989.4 TFLOP/s.
        name="NVIDIA H100 SXM", fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9,
        multiprocessors=132, mig_slices=7,
        patterns=(r"^h100\b(?!.*\b(nvl|pcie)\b).*\b(sxm\w*|hbm3e?)\b", r"^h100( \d+gb)?$"),
        aliases=("h100", "h100-sxm5"),
        source="NVIDIA H100 Tensor Core GPU datasheet (2023), SXM column, sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA H100 PCIe", fp32=51.0, tf32=378.0, bf16=756.0, fp16=756.0, fp8=1513.0,
        multiprocessors=114, mig_slices=7,
        patterns=(r"^h100\b.*\bpcie\b", r"^h100( \d+gb)?$"),
        source="NVIDIA H100 Tensor Core GPU datasheet (2023), PCIe column, sparse figures halved; "
               "BF16 756 dense as the NVIDIA H100 architecture whitepaper (2022) prints it",
    ),
    GpuSpec(
        # Per GPU: an early datasheet printed the two-GPU pair's sparse figures (3,958 BF16).
        name="NVIDIA H100 NVL", fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5,
        multiprocessors=132, mig_slices=7,
        patterns=(r"^h100\b.*\bnvl\b",),
        source="NVIDIA H100 Tensor Core GPU datasheet (2024), H100 NVL column (per GPU), sparse figures halved",
    ),
    GpuSpec(
        # The H100 SXM's compute with more and faster memory: the same matrix rate.
        name="NVIDIA H200 SXM", fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9,
        multiprocessors=132, mig_slices=7,
        patterns=(r"^h200\b(?!.*\bnvl\b)",), aliases=("h200",),
        source="NVIDIA H200 Tensor Core GPU datasheet (2024), SXM column, sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA H200 NVL", fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5,
        multiprocessors=132, mig_slices=7,
        patterns=(r"^h200\b.*\bnvl\b",),
        source="NVIDIA H200 Tensor Core GPU datasheet (2024), H200 NVL column, sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA H20", fp32=44.0, tf32=74.0, bf16=148.0, fp16=148.0, fp8=296.0,
        multiprocessors=78, mig_slices=7,
        patterns=(r"^h20\b",),
        source="NVIDIA H20 product brief (2024, distributed to partners), dense figures as reported by them",
    ),
    GpuSpec(
        # The Hopper GPU of the superchip is an H100 SXM (132 SMs) in both memory variants.
        name="NVIDIA GH200", fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9,
        multiprocessors=132, mig_slices=7,
        patterns=(r"^gh200\b",),
        source="NVIDIA GH200 Grace Hopper Superchip datasheet (2024), sparse figures halved",
    ),
    # -- NVIDIA Blackwell ---------------------------------------------------------------------------
    GpuSpec(
        name="NVIDIA B200", fp32=75.0, tf32=1100.0, bf16=2250.0, fp16=2250.0, fp8=4500.0,
        multiprocessors=148, mig_slices=7,
        patterns=(r"^b200\b",),
        source="NVIDIA HGX B200 datasheet (2025), per GPU, sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA GB200", fp32=80.0, tf32=1250.0, bf16=2500.0, fp16=2500.0, fp8=5000.0, mig_slices=7,
        patterns=(r"^gb200\b",),
        source="NVIDIA GB200 NVL72 datasheet (2024), per GPU, sparse figures halved",
    ),
    GpuSpec(
        name="NVIDIA GeForce RTX 5090", fp32=104.8, tf32=104.8, bf16=209.5, fp16=209.5, fp8=419.0,
        multiprocessors=170,
        patterns=(r"^rtx 5090$",), aliases=("5090",),
        source="NVIDIA RTX Blackwell GPU architecture whitepaper (2025), RTX 5090: dense BF16/FP16/FP8 "
               "with FP32 accumulate",
    ),
    # -- AMD CDNA (no sparse figures mixed in; FP32 is the matrix-core rate) ------------------------
    GpuSpec(
        # torch sees each of the package's two dies (GCDs, 110 CUs each) as one device: half the package.
        name="AMD Instinct MI250X", fp32=47.85, bf16=191.5, fp16=191.5, multiprocessors=110,
        patterns=(r"\bmi250x\b",),
        source="AMD Instinct MI250X data sheet (2021): 383 TFLOPS BF16/FP16 and 95.7 FP32 matrix per "
               "package, halved per GCD",
    ),
    GpuSpec(
        name="AMD Instinct MI250", fp32=45.25, bf16=181.05, fp16=181.05, multiprocessors=104,
        patterns=(r"\bmi250\b",),
        source="AMD Instinct MI250 data sheet (2021): 362.1 TFLOPS BF16/FP16 and 90.5 FP32 matrix per "
               "package, halved per GCD",
    ),
    GpuSpec(
        name="AMD Instinct MI300X", fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9,
        multiprocessors=304,
        patterns=(r"\bmi300x\b",),
        source="AMD Instinct MI300X data sheet (2023), dense figures",
    ),
    GpuSpec(
        name="AMD Instinct MI325X", fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9,
        multiprocessors=304,
        patterns=(r"\bmi325x\b",),
        source="AMD Instinct MI325X data sheet (2024), dense figures",
    ),
)
# fmt: on

_PEAK_FIELDS = tuple(field.name for field in fields(GpuSpec) if field.name in COMPUTE_DTYPES)

# Memory bandwidth of one GPU in TB/s (1e12 bytes/s), from the same datasheets as the peaks: what a
# decode step, which reads every weight and the KV cache for a few tokens, is bound by. Keyed by the
# peak table's names; a test checks that every row has one.
# fmt: off
MEMORY_BANDWIDTH: dict[str, tuple[float, str]] = {
    "NVIDIA V100 SXM2": (0.900, "NVIDIA V100 Tensor Core GPU datasheet (2020): 900 GB/s HBM2"),
    "NVIDIA V100 PCIe": (0.900, "NVIDIA V100 Tensor Core GPU datasheet (2020): 900 GB/s HBM2"),
    "NVIDIA V100S PCIe": (1.134, "NVIDIA V100 Tensor Core GPU datasheet (2020), V100S: 1,134 GB/s"),
    "NVIDIA T4": (0.320, "NVIDIA T4 Tensor Core GPU datasheet (2019): 320+ GB/s GDDR6"),
    "NVIDIA A10": (0.600, "NVIDIA A10 Tensor Core GPU datasheet (2021): 600 GB/s GDDR6"),
    "NVIDIA A10G": (0.600, "AWS EC2 G5 instance specifications (2021): A10G, 600 GB/s GDDR6"),
    "NVIDIA A30": (0.933, "NVIDIA A30 Tensor Core GPU datasheet (2021): 933 GB/s HBM2"),
    "NVIDIA A40": (0.696, "NVIDIA A40 datasheet (2020): 696 GB/s GDDR6"),
    "NVIDIA A100 SXM4 40GB": (1.555, "NVIDIA A100 Tensor Core GPU datasheet (2021): 1,555 GB/s HBM2"),
    "NVIDIA A100 SXM4 80GB": (2.039, "NVIDIA A100 Tensor Core GPU datasheet (2021): 2,039 GB/s HBM2e"),
    "NVIDIA A100 PCIe 40GB": (1.555, "NVIDIA A100 Tensor Core GPU datasheet (2021): 1,555 GB/s HBM2"),
    "NVIDIA A100 PCIe 80GB": (1.935, "NVIDIA A100 Tensor Core GPU datasheet (2021): 1,935 GB/s HBM2e"),
    "NVIDIA RTX A6000": (0.768, "NVIDIA RTX A6000 datasheet (2021): 768 GB/s GDDR6"),
    "NVIDIA GeForce RTX 3090": (0.936, "NVIDIA Ampere GA102 GPU architecture whitepaper (2021), RTX 3090: 936 GB/s"),
    "NVIDIA L4": (0.300, "NVIDIA L4 Tensor Core GPU datasheet (2023): 300 GB/s GDDR6"),
    "NVIDIA L40": (0.864, "NVIDIA L40 GPU datasheet (2022): 864 GB/s GDDR6"),
    "NVIDIA L40S": (0.864, "NVIDIA L40S GPU datasheet (2023): 864 GB/s GDDR6"),
    "NVIDIA GeForce RTX 4090": (1.008, "NVIDIA Ada GPU architecture whitepaper (2022), RTX 4090: 1,008 GB/s"),
    "NVIDIA H100 SXM": (3.35, "NVIDIA H100 Tensor Core GPU datasheet (2023), SXM: 3.35 TB/s HBM3"),
    "NVIDIA H100 PCIe": (2.0, "NVIDIA H100 Tensor Core GPU datasheet (2023), PCIe: 2 TB/s HBM2e"),
    "NVIDIA H100 NVL": (3.9, "NVIDIA H100 Tensor Core GPU datasheet (2024), H100 NVL: 3.9 TB/s per GPU"),
    "NVIDIA H200 SXM": (4.8, "NVIDIA H200 Tensor Core GPU datasheet (2024), SXM: 4.8 TB/s HBM3e"),
    "NVIDIA H200 NVL": (4.8, "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 NVL: 4.8 TB/s HBM3e"),
    "NVIDIA H20": (4.0, "NVIDIA H20 product brief (2024), as reported by partners: 4.0 TB/s HBM3"),
    "NVIDIA GH200": (4.0, "NVIDIA GH200 Grace Hopper Superchip datasheet (2024): 4 TB/s with 96 GB HBM3 "
                          "(4.9 TB/s for the 144 GB HBM3e variant)"),
    "NVIDIA B200": (8.0, "NVIDIA HGX B200 datasheet (2025): 8 TB/s HBM3e per GPU"),
    "NVIDIA GB200": (8.0, "NVIDIA GB200 NVL72 datasheet (2024): 576 TB/s for 72 GPUs, 8 TB/s per GPU"),
    "NVIDIA GeForce RTX 5090": (1.792, "NVIDIA RTX Blackwell GPU architecture whitepaper (2025), RTX 5090: 1,792 GB/s"),
    "AMD Instinct MI250X": (1.6384, "AMD Instinct MI250X data sheet (2021): 3.2768 TB/s per package, halved per GCD"),
    "AMD Instinct MI250": (1.6384, "AMD Instinct MI250 data sheet (2021): 3.2768 TB/s per package, halved per GCD"),
    "AMD Instinct MI300X": (5.3, "AMD Instinct MI300X data sheet (2023): 5.3 TB/s HBM3"),
    "AMD Instinct MI325X": (6.0, "AMD Instinct MI325X data sheet (2024): 6 TB/s HBM3e"),
}
# fmt: on
_warned_keys: set[str] = set()


def known_gpus() -> list[str]:
    """Canonical names of every chip in the table."""
    return [row.name for row in PEAK_TABLE]


def short_gpu_names() -> list[str]:
    """The name people type for each chip ("h100", "a100-pcie", "l40s", "mi300x"): its first alias, else its
    canonical name without the vendor's words, where that finds the same row (else the canonical name)."""
    names = []
    for row in PEAK_TABLE:
        words = [word for word in row.name.lower().split() if word not in _VENDOR_WORDS]
        short = row.aliases[0] if row.aliases else "-".join(words)
        names.append(short if lookup_gpu(short) is row else row.name)
    return names


def lookup_gpu(name: str) -> GpuSpec | None:
    """The table row for a short name ("h100", "a100-40gb", "mi300x", "4090"), a canonical name, or a device name.

    A bare family name means its most common form ("h100" is the H100 SXM). A device name that
    fits several rows with different figures gives None.
    """
    wanted = _compact(name)
    for row in PEAK_TABLE:
        if wanted == _compact(row.name) or wanted in {_compact(alias) for alias in row.aliases}:
            return row
    rows, _ = _matching_rows(name, None)
    if rows and all(_figures(row) == _figures(rows[0]) for row in rows):
        return rows[0]
    return None


def peak_flops(
    device_or_name: torch.device | int | str, dtype: torch.dtype | str, *, multiprocessors: int | None = None
) -> float | None:
    """Dense peak FLOP/s of one GPU at ``dtype``; None for an unknown device or a dtype the chip lacks.

    ``device_or_name``: a ``torch.device``, a CUDA device index, or a device name as
    ``torch.cuda.get_device_name()`` reports it ("NVIDIA H100 80GB HBM3", MIG slices included).
    ``multiprocessors`` (SM count) tells apart chips that share a name; for a device it is read
    from the device. ``dtype``: a torch dtype or a key ("bf16", "fp16", "tf32", "fp32", "fp8").
    """
    key = parse_compute_dtype(dtype)
    identity = _identify(device_or_name, multiprocessors)
    if identity is None:
        return None
    tflops, _, _ = _table_peak(*identity, key)
    return tflops * 1e12 if tflops is not None else None


def resolve_peak(
    device: torch.device | int | str | None, dtype: torch.dtype | str, *, override_tflops: float | None = None
) -> PeakInfo | None:
    """The peak an integration divides by: ``override_tflops``, else ``$MFU_PEAK_TFLOPS``, else the table.

    An unknown device gives None after one warning per process per device name (naming both ways
    to give the peak). A CPU device gives None silently unless an override is given. ``device``
    None means the current CUDA device, or the CPU without CUDA.
    """
    key = parse_compute_dtype(dtype, device=device if isinstance(device, (torch.device, int)) else None)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    identity = _identify(device, None)
    device_name = identity[0] if identity is not None else str(device)
    override = _validate.peak_tflops(override_tflops)
    if override is not None:
        return PeakInfo(override * 1e12, device_name, key, "override argument")
    env_tflops = _validate.env_peak_tflops()
    if env_tflops is not None:
        return PeakInfo(env_tflops * 1e12, device_name, key, PEAK_ENV_VAR)
    if identity is None:
        return None
    tflops, row, problem = _table_peak(*identity, key)
    if tflops is None or row is None:
        _warn_once(
            f"{device_name}|{key}" if row is not None else device_name,
            f"mfu_callbacks: device {device_name!r} {problem}; MFU and HFU are left out. Give the dense "
            f"peak TFLOP/s of one GPU with peak_tflops= (on the callback or meter) or the environment "
            f"variable {PEAK_ENV_VAR}.",
        )
        return None
    table = tuple(
        (dtype, figure * 1e12)
        for dtype in COMPUTE_DTYPES
        if (figure := _table_peak(*identity, dtype)[0]) is not None
    )
    return PeakInfo(tflops * 1e12, device_name, key, row.source, table)


def memory_bandwidth(
    device_or_name: torch.device | int | str, *, multiprocessors: int | None = None
) -> tuple[float, str] | None:
    """Datasheet memory bandwidth of one GPU in bytes/s, and its source; None for an unknown device.

    A MIG slice gets its share of the chip (memory slices follow compute slices in every profile).
    """
    identity = _identify(device_or_name, multiprocessors)
    if identity is None:
        return None
    rows, compute_slices = _matching_rows(*identity)
    figures = {MEMORY_BANDWIDTH.get(row.name) for row in rows}
    if len(figures) != 1 or None in figures:
        return None
    ((tbps, source),) = figures  # type: ignore[misc]
    return tbps * 1e12 * _chip_share(rows[0], compute_slices, identity[1]), source


# -- identifying the device ---------------------------------------------------------------------------
def _identify(
    device_or_name: torch.device | int | str, multiprocessors: int | None
) -> tuple[str, int | None] | None:
    """The device's name and multiprocessor count; None for a host device (CPU, meta)."""
    device = _as_device(device_or_name)
    if device is None:
        return str(device_or_name), multiprocessors
    if device.type in _HOST_DEVICE_TYPES:
        return None
    if device.type != "cuda":  # CUDA covers ROCm too; other accelerators have no rows
        return str(device), None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return torch.cuda.get_device_name(index), properties.multi_processor_count
    except (AssertionError, RuntimeError):  # torch without CUDA, or no such device
        return str(device), None


def _as_device(device_or_name: torch.device | int | str) -> torch.device | None:
    """A torch.device for a device, an index or a device string ("cuda:1"); None for a GPU name."""
    if isinstance(device_or_name, torch.device):
        return device_or_name
    if isinstance(device_or_name, int) and not isinstance(device_or_name, bool):
        return torch.device("cuda", device_or_name)
    if isinstance(device_or_name, str) and _DEVICE_SPEC.match(device_or_name.strip().lower()):
        return torch.device(device_or_name.strip().lower())
    return None


def _words(name: str) -> list[str]:
    """Lower-case words of a device name, vendor words dropped ("NVIDIA", "Tesla", "AMD Instinct", ...)."""
    words = re.sub(r"[\s_\-,]+|\(tm\)|\(r\)|®|™", " ", name.lower()).split()
    return [word for word in words if word not in _VENDOR_WORDS]


def _compact(name: str) -> str:
    """A name with vendor words and punctuation gone, for short-name matching ("H100-PCIe" -> "h100pcie")."""
    return re.sub(r"[^a-z0-9]", "", "".join(_words(name)))


def _matching_rows(name: str, multiprocessors: int | None) -> tuple[list[GpuSpec], int | None]:
    """Rows whose patterns fit ``name``, and the compute slices of a MIG instance (None for a whole chip).

    On a whole chip a known multiprocessor count must equal the row's: it picks between chips that
    share a name and turns away cut-down variants. On a MIG slice the count is the slice's own.
    """
    lowered = name.lower()
    mig = _MIG_PROFILE.search(lowered)
    compute_slices = None
    if mig is not None:
        compute_slices = int(mig.group(1) or mig.group(2))
        lowered = lowered[: mig.start()]
    normalized = " ".join(_words(lowered))
    rows = [row for row in PEAK_TABLE if any(re.search(pattern, normalized) for pattern in row.patterns)]
    if compute_slices is not None:
        rows = [row for row in rows if row.mig_slices is not None]
    elif multiprocessors is not None:
        rows = [row for row in rows if row.multiprocessors in (None, multiprocessors)]
    return rows, compute_slices


def _chip_share(row: GpuSpec, compute_slices: int | None, multiprocessors: int | None) -> float:
    """The fraction of the chip a device has: 1 for a whole chip, the SM (or slice) share for a MIG instance."""
    if compute_slices is None:
        return 1.0
    if multiprocessors is not None and row.multiprocessors and 0 < multiprocessors <= row.multiprocessors:
        return multiprocessors / row.multiprocessors
    return compute_slices / (row.mig_slices or _DEFAULT_MIG_SLICES)


def _table_peak(name: str, multiprocessors: int | None, key: str) -> tuple[float | None, GpuSpec | None, str]:
    """Dense TFLOP/s from the table, the row it came from, and what went wrong when there is none."""
    rows, compute_slices = _matching_rows(name, multiprocessors)
    if not rows:
        with_count = f" with {multiprocessors} multiprocessors" if multiprocessors is not None else ""
        return None, None, f"is not in the dense peak table{with_count}"
    values = {row.dense_tflops(key) for row in rows}
    if len(values) > 1:
        names = ", ".join(row.name for row in rows)
        return None, None, f"fits several rows of the peak table ({names}) that differ at {key}"
    (per_chip,) = values
    if per_chip is None:
        return None, rows[0], f"({rows[0].name}) has no dense {key} figure in the peak table"
    return per_chip * _chip_share(rows[0], compute_slices, multiprocessors), rows[0], ""


def _figures(row: GpuSpec) -> tuple[float | None, ...]:
    return tuple(getattr(row, name) for name in _PEAK_FIELDS)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_keys:
        _warned_keys.add(key)
        logger.warning(message)
