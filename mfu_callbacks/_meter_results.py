"""What the meter's run read so far (``MFUMeter``'s part for the run summary and for resuming): the
run's sums and FLOPs, the peak of each dtype the matmuls ran in, and the state a resumed run continues.
A part of the meter's interface on its own (a mixin, as Lightning's ``LightningModule`` is made of
``ModelHooks``, ``DataHooks`` and ``CheckpointHooks``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._meter_read import WindowReader
from ._meter_state import meter_state, read_meter_state
from ._peak_choice import PeakChoice
from ._recorder import StepRecorder
from ._window import PeakFlops
from .diagnostics import Diagnostics
from .flops import StepFlops

if TYPE_CHECKING:
    from .hardware import PeakInfo


class RunSoFar:
    """The run-summary and resuming methods of ``MFUMeter``, over the parts the meter builds."""

    _reader: WindowReader
    _peaks: PeakChoice
    _recorder: StepRecorder
    _diagnostics: Diagnostics

    def dtype_peaks(self) -> dict[str, PeakInfo] | None:
        """The peak of each dtype key when the matmuls run in dtypes of different peaks, else None
        (``PeakChoice.dtype_peaks``)."""
        return self._peaks.dtype_peaks(self._recorder.engine)

    def _peak_flops(self) -> PeakFlops | None:
        """What MFU divides by (``_window.utilization``): one peak, or one per dtype key."""
        return self._peaks.peak_flops(self._recorder.engine)

    def matmul_dtypes(self) -> dict[str, tuple[float, PeakInfo | None]]:
        """Per dtype the matmuls ran in ("bf16", "fp8", ...): its share of the model FLOPs read so far,
        and the peak it is judged against (None without a peak); {} before any counted step."""
        return self._peaks.matmul_dtypes(self.run_flops(), self._recorder.engine)

    def run_totals(self) -> dict[str, float]:
        """The sums the run summary divides (all ranks, every measured step read so far): the run
        summary file stores them, so that ``mfu-callbacks compare`` computes the report's figures."""
        totals = self._reader.run.totals()
        if self._peaks.peak is not None:
            totals["peak_flops"] = float(self._peaks.peak.flops)
        return totals

    def run_flops(self) -> StepFlops | None:
        """This rank's FLOPs over every measured step read so far (with the per-component breakdown)."""
        features, engine = self._reader.run_features, self._recorder.engine
        return engine.evaluate(features) if features is not None and engine is not None else None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this run's summary, as plain (JSON-able) values.

        The run totals, the FLOP features read so far and the diagnoses fired. Steps not yet read
        are not included (reading them would be a collective): at most one log interval. Warm-up is
        not carried over: a resumed process compiles and warms its allocator again.
        """
        return meter_state(self._reader.run, self._reader.run_features, self._diagnostics)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` of an earlier run (before its first step is read)."""
        self._reader.run, self._reader.run_features, diagnoses = read_meter_state(state)
        self._diagnostics.load_state_dict(diagnoses)
