"""The peak table: one :class:`GpuSpec` row per chip with its dense datasheet TFLOP/s per dtype, and
each chip's memory bandwidth, with the datasheet every figure comes from.

Data only; :mod:`mfu_callbacks.hardware` reads it (name matching, MIG shares, the peak MFU divides
by). Datasheets often print the sparse figure first; where a row says "sparse figures halved", the
dense figure is half the printed one. GeForce figures are the whitepapers' dense BF16/FP16 rates
with FP32 accumulate (what PyTorch's GEMMs use), which on those cards is half the FP16-accumulate rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .precision import COMPUTE_DTYPES


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
