"""The peak each matmul is judged against when a step's matmuls run in several dtypes.

fp8 training runs the decoder's linears in fp8 and leaves attention and the head in bf16. Judging the
whole step against the fp8 peak makes the bf16 part look half as fast as it is; judging it against
the bf16 peak (torchtitan's convention) credits the fp8 part with twice its rate. MFU here judges each
dtype's FLOPs against its own dense peak (``_window.utilization``); these functions find those peaks
and each dtype's share of the FLOPs, for the meter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .flops.dtypes import RUN_DTYPE
from .flops.step_flops import StepFlops

if TYPE_CHECKING:
    from .hardware import PeakInfo

logger = logging.getLogger("mfu_callbacks")


def peaks_by_dtype(
    peak: PeakInfo, keys: frozenset[str], run_dtype: Callable[[], str]
) -> dict[str, PeakInfo] | None:
    """The peak of each dtype key the engine counts in (``RUN_DTYPE`` is ``run_dtype()``), from the same
    GPU's row of the table as ``peak``; None where one peak serves: every key at the same dtype, or a
    dtype that ``peak`` cannot give (a peak given by hand holds for one dtype)."""
    if not keys - {RUN_DTYPE}:
        return None
    run = run_dtype()
    peaks: dict[str, PeakInfo] = {}
    for key in keys:
        info = peak.at(key or run)
        if info is None:
            if peak.table:
                logger.warning(
                    "mfu_callbacks: %s has no dense %s figure in the peak table; every matmul is judged "
                    "against its %s peak",
                    peak.device_name,
                    key or run,
                    peak.dtype,
                )
            return None
        peaks[key] = info
    return peaks if len({info.dtype for info in peaks.values()}) > 1 else None


def dtype_shares(
    flops: StepFlops,
    peaks: dict[str, PeakInfo] | None,
    peak: PeakInfo | None,
    run_dtype: Callable[[], str],
) -> dict[str, tuple[float, PeakInfo | None]]:
    """Per dtype name ("fp8", "bf16"), largest first: its share of ``flops.model_flops`` and the peak it is
    judged against (its own from ``peaks``, else ``peak``, which judges them all)."""
    shares: dict[str, tuple[float, PeakInfo | None]] = {}
    for key, amount in sorted(flops.model_by_dtype.items(), key=lambda item: -item[1]):
        judged = peaks[key] if peaks is not None else peak
        name = judged.dtype if peaks is not None and judged is not None else key or run_dtype()
        shares[name] = (shares.get(name, (0.0, judged))[0] + amount / flops.model_flops, judged)
    return shares
