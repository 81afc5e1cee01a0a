"""Measured slowdowns of matmuls whose sizes are off the tensor cores' alignment, as data.

A shape diagnosis claims a cost only where a row here (or a measurement in the run itself, see
``measured.py``) says what that shape costs on this GPU family at this dtype. Each row is one
measurement: a linear layer's forward + backward (three GEMMs: the forward, the input gradient and
the weight gradient, so the misaligned size is in turn the N, K and M dimension) at a misaligned
size against the next multiple of 64, with the command that measured it and when.

``benchmarks/bench_vocab_sweep.py --out rows.json`` measures new rows on a GPU and writes them in
the format of :func:`Slowdown.from_dict`; paste them into ``MEASURED``.

GPU families: chips of one architecture run the same GEMM kernels, and the cliff is a property of
the kernels (a misaligned leading dimension rules out the TMA-based Hopper kernels and cuBLAS falls
back to a slower kind), not of the SM count or the memory. So a row measured on an H100 SXM stands
for the H100 PCIe and NVL, the H200 and the GH200, whose GPU is the same sm_90 chip; the size of
the gap may still differ a little between them, and the message names the GPU it was measured on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from typing import Any

from ..hardware import lookup_gpu

# Shape classes, for a size that should be a multiple of 64 (the widest tile of bf16 GEMMs):
NOT_MULTIPLE_OF_8 = "not_multiple_of_8"  # off the 16-byte alignment of bf16/fp16 operands
MULTIPLE_OF_8_NOT_64 = "multiple_of_8_not_64"  # aligned operands, partial last tile
# Roles of the misaligned size in a linear layer (in_features x out_features on T tokens).
OUT_FEATURES = "out_features"  # an LM head's vocabulary, an up-projection's width
IN_FEATURES = "in_features"  # a down-projection's input width

# Canonical peak-table names (hardware.py) of each family.
GPU_FAMILIES: Mapping[str, tuple[str, ...]] = {
    "hopper": (
        "NVIDIA H100 SXM",
        "NVIDIA H100 PCIe",
        "NVIDIA H100 NVL",
        "NVIDIA H200 SXM",
        "NVIDIA H200 NVL",
        "NVIDIA GH200",
        "NVIDIA H20",
    ),
}


@dataclass(frozen=True)
class Slowdown:
    """One measurement: how much slower a linear layer's forward + backward ran at a misaligned size.

    slowdown: time at the misaligned size over time at the aligned size, per FLOP (1.0: no cost).
    tflops: the rate the misaligned layer ran at (to turn a layer's FLOPs into its time); None
    where only the ratio was recorded. The rest says what was measured, where, when and how.
    """

    family: str
    dtype: str
    shape_class: str
    role: str
    slowdown: float
    tflops: float | None
    aligned_tflops: float | None
    gpu: str
    other_size: int  # the layer's other size (the hidden size of an LM head)
    tokens: int
    sizes: tuple[int, ...]  # the misaligned sizes measured; ``slowdown`` is the least of theirs
    source: str
    date: str

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Slowdown:
        """A row from its JSON form (what the benchmark writes)."""
        return cls(**{**values, "sizes": tuple(values["sizes"])})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sizes": list(self.sizes)}

    @cached_property  # named in every misaligned layer's cost, at every review
    def label(self) -> str:
        """How a message names this measurement."""
        return (
            f"{self.slowdown:.1f}x slower, measured on {self.gpu} at {self.dtype} "
            f"({self.role} {', '.join(map(str, self.sizes))}, other size {self.other_size}, {self.tokens} tokens; "
            f"{self.source}, {self.date})"
        )


_SWEEP = "LM head forward + backward, torch 2.11; re-measure: benchmarks/bench_vocab_sweep.py"
# fmt: off
MEASURED: tuple[Slowdown, ...] = (
    # `python benchmarks/bench_vocab_sweep.py --roles out,in` on an NVIDIA H100 80GB HBM3, torch 2.11,
    # bf16, 8192 tokens: a linear layer's forward + backward with the size in the role given, against
    # the next multiple of 64 (benchmarks/RESULTS.md has every size).
    Slowdown(
        family="hopper", dtype="bf16", shape_class=MULTIPLE_OF_8_NOT_64, role=OUT_FEATURES,
        slowdown=1.0, tflops=716.2, aligned_tflops=727.2, gpu="H100 SXM", other_size=2048,
        tokens=8192, sizes=(32008, 50264, 128264), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=NOT_MULTIPLE_OF_8, role=OUT_FEATURES,
        slowdown=5.49, tflops=133.1, aligned_tflops=728.8, gpu="H100 SXM", other_size=2048,
        tokens=8192, sizes=(32001, 50257, 128257, 151643), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=MULTIPLE_OF_8_NOT_64, role=OUT_FEATURES,
        slowdown=1.0, tflops=724.5, aligned_tflops=704.3, gpu="H100 SXM", other_size=4096,
        tokens=8192, sizes=(32008, 50264, 128264), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=NOT_MULTIPLE_OF_8, role=OUT_FEATURES,
        slowdown=5.26, tflops=133.9, aligned_tflops=699.3, gpu="H100 SXM", other_size=4096,
        tokens=8192, sizes=(32001, 50257, 128257, 151643), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=MULTIPLE_OF_8_NOT_64, role=IN_FEATURES,
        slowdown=1.05, tflops=684.9, aligned_tflops=707.0, gpu="H100 SXM", other_size=2048,
        tokens=8192, sizes=(32008, 50264, 128264), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=NOT_MULTIPLE_OF_8, role=IN_FEATURES,
        slowdown=4.88, tflops=144.9, aligned_tflops=711.3, gpu="H100 SXM", other_size=2048,
        tokens=8192, sizes=(32001, 50257, 128257, 151643), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=MULTIPLE_OF_8_NOT_64, role=IN_FEATURES,
        slowdown=1.09, tflops=657.6, aligned_tflops=714.7, gpu="H100 SXM", other_size=4096,
        tokens=8192, sizes=(32008, 50264, 128264), source=_SWEEP, date="2026-11-25",
    ),
    Slowdown(
        family="hopper", dtype="bf16", shape_class=NOT_MULTIPLE_OF_8, role=IN_FEATURES,
        slowdown=4.79, tflops=145.2, aligned_tflops=705.0, gpu="H100 SXM", other_size=4096,
        tokens=8192, sizes=(32001, 50257, 128257, 151643), source=_SWEEP, date="2026-11-25",
    ),
)
# fmt: on


@lru_cache(maxsize=64)  # read for every layer at every metrics read: the table lookup is not free
def gpu_family(device_name: str | None) -> str | None:
    """The family of a device name as torch reports it ("NVIDIA H100 80GB HBM3" is "hopper"); None if unknown."""
    if not device_name:
        return None
    spec = lookup_gpu(device_name)
    if spec is None:
        return None
    return next((family for family, names in GPU_FAMILIES.items() if spec.name in names), None)


def shape_class(size: int) -> str | None:
    """The class of a size (None for a multiple of 64: nothing to measure)."""
    if size % 8:
        return NOT_MULTIPLE_OF_8
    return MULTIPLE_OF_8_NOT_64 if size % 64 else None


def find(
    device_name: str | None,
    dtype: str | None,
    size: int,
    role: str,
    other_size: int | None = None,
    table: Iterable[Slowdown] | None = None,
) -> Slowdown | None:
    """The measurement for a size in a role on this device and dtype; None where nothing was measured.

    Of several rows, the one measured with the nearest other size of the layer (``other_size``).
    """
    if table is None:
        return _find_measured(device_name, dtype, size, role, other_size)
    return _find(device_name, dtype, size, role, other_size, table)


@lru_cache(maxsize=4096)  # the checks ask for the same layers' sizes at every metrics read
def _find_measured(
    device_name: str | None, dtype: str | None, size: int, role: str, other_size: int | None
) -> Slowdown | None:
    return _find(device_name, dtype, size, role, other_size, MEASURED)


def _find(
    device_name: str | None,
    dtype: str | None,
    size: int,
    role: str,
    other_size: int | None,
    table: Iterable[Slowdown],
) -> Slowdown | None:
    family, wanted = gpu_family(device_name), shape_class(size)
    if family is None or wanted is None:
        return None
    rows = [
        row
        for row in table
        if row.family == family and row.dtype == dtype and row.shape_class == wanted and row.role == role
    ]
    if not rows:
        return None
    return min(rows, key=lambda row: abs(row.other_size - (other_size or row.other_size)))
