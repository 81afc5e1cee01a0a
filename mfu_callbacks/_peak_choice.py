"""Which dense peak MFU divides by: the GPU's at the dtype the matmuls run in, chosen when the meter is
built and chosen again at the first forward when autocast (entered after the meter) changes that dtype;
one peak per dtype when the step's matmuls run in dtypes of different peaks (fp8 beside bf16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._dtype_peaks import dtype_shares, peaks_by_dtype
from ._options import MFUOptions
from ._window import PeakFlops
from .flops import FlopEngine, StepFlops
from .precision import AutocastWatch, detect_compute_dtype

if TYPE_CHECKING:
    from .hardware import PeakInfo


class PeakChoice:
    """The peak of one meter's run, and the dtypes it is judged at.

    ``options``: its ``dtype`` (one dtype to judge every matmul at) and ``peak_tflops`` (a peak given by
    hand); ``run_dtype``: the framework's precision (the matmuls not in fp8); ``peak``: a ready-made one.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        options: MFUOptions,
        run_dtype: str | torch.dtype | None = None,
        peak: PeakInfo | None = None,
    ) -> None:
        self._model = model
        self._device = device
        self.dtype_given = dtype = options.dtype
        self._run_dtype_given = run_dtype
        self._peak_tflops = options.peak_tflops
        given = dtype if dtype is not None else run_dtype
        self.peak = peak if peak is not None else resolve_peak(model, device, given, self._peak_tflops)
        self._dtype_peaks: tuple[FlopEngine, dict[str, PeakInfo] | None] | None = None  # for that engine
        # Autocast is entered around the forward, after the meter is built: look at the first forward
        # and (unless the dtype or peak was given) pick the peak of the dtype the matmuls really run in.
        self._repick = given is None and peak is None
        self.autocast = AutocastWatch(model, device, on_first_forward=self._check_dtype)

    def _check_dtype(self, module: nn.Module) -> None:
        if (
            self._repick
            and self.peak is not None
            and detect_compute_dtype(module, device=self._device) != self.peak.dtype
        ):
            self.peak = resolve_peak(module, self._device, None, self._peak_tflops)
            self._dtype_peaks = None

    def dtype_peaks(self, engine: FlopEngine | None) -> dict[str, PeakInfo] | None:
        """The peak each matmul is judged against, by the engine's dtype key ("" for the run's dtype,
        "fp8"), when the step's matmuls run in dtypes of different peaks; None when ``peak`` judges
        them all: one dtype, a ``dtype`` given, a peak given by hand (it holds for one dtype), no peak."""
        if engine is None or self.peak is None or self.dtype_given is not None:
            return None
        if self._dtype_peaks is None or self._dtype_peaks[0] is not engine:
            keys: frozenset[str] = getattr(engine, "dtypes", frozenset())  # a ready-made one: the run's alone
            peaks = peaks_by_dtype(self.peak, keys, self.run_dtype)
            if not self.autocast.seen:  # the run's dtype is known at the first forward
                return peaks
            self._dtype_peaks = (engine, peaks)
        return self._dtype_peaks[1]

    def peak_flops(self, engine: FlopEngine | None) -> PeakFlops | None:
        """What MFU divides by (``_window.utilization``): one peak, or one per dtype key."""
        peaks = self.dtype_peaks(engine)
        if peaks is not None:
            return {key: info.flops for key, info in peaks.items()}
        return self.peak.flops if self.peak is not None else None

    def matmul_dtypes(
        self, flops: StepFlops | None, engine: FlopEngine | None
    ) -> dict[str, tuple[float, PeakInfo | None]]:
        """Per dtype the matmuls ran in: its share of ``flops``' model FLOPs and its peak; {} without FLOPs."""
        if flops is None or flops.model_flops <= 0:
            return {}
        run_dtype: Callable[[], str] = self.run_dtype
        return dtype_shares(flops, self.dtype_peaks(engine), self.peak, run_dtype)

    def compute_dtype(self) -> str | None:
        """The dtype the matmuls run in: the peak's, else as given, seen under autocast, or stored."""
        if self.peak is not None:
            return self.peak.dtype
        try:
            override = self.dtype_given or self._run_dtype_given or self.autocast.dtype
            return detect_compute_dtype(self._model, override=override, device=self._device)
        except (ValueError, RuntimeError):
            return None

    def run_dtype(self) -> str:
        """The dtype of the matmuls that do not run in fp8: as the framework says, seen under autocast,
        or stored (the model's fp8 layers aside)."""
        override = self._run_dtype_given or self.autocast.dtype
        return detect_compute_dtype(self._model, override=override, device=self._device, fp8_layers=False)


def resolve_peak(
    model: nn.Module, device: torch.device, dtype: str | torch.dtype | None, peak_tflops: float | None
) -> PeakInfo | None:
    """The dense peak of one GPU at the dtype the matmuls run in; None (after a warning) when unknown."""
    from .hardware import resolve_peak as from_table

    compute_dtype = detect_compute_dtype(model, override=dtype, device=device)
    return from_table(device, compute_dtype, override_tflops=peak_tflops)


def memory_bandwidth(device: torch.device) -> float | None:
    """Datasheet memory bandwidth of the GPU in bytes/s; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    from .hardware import memory_bandwidth as from_table

    found = from_table(device)
    return found[0] if found is not None else None
