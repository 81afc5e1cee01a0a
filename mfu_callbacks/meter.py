"""The MFU meter every integration shares; it knows no training framework.

    meter = MFUMeter(model, peak_tflops=989.4)          # or let the table find the peak
    for step, batch in enumerate(loader):
        meter.start_step(batch)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end_step()
        if step % 10 == 0:
            print(meter.metrics())                      # {"mfu": 0.41, "tflops_per_gpu": 405.6, ...}

Per step the meter records two timing events (one where the GPU still runs the previous step) and
adds the batch's token counts (a small int64 tensor on the batch's device) into a bounded buffer on
that device: nothing waits for the GPU. At log time the steps the GPU has finished are read (the
others wait for the next read), one copy brings their counts to the host, the FLOP engine turns them
into FLOPs, and one reduction combines the ranks. The read's own cost is part of the time base, which
is the wall clock. The logged keys are listed in ``mfu_callbacks.metrics``.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Unpack

import torch
from torch import nn

from . import _validate, distributed, metrics
from ._meter_generation import GenerationHooks, generation_phase
from ._meter_profile import profile_step_begins, profiled_steps, step_breakdown
from ._meter_read import WindowReader
from ._meter_results import RunSoFar
from ._options import MeterKeywords, MFUOptions, meter_options
from ._peak_choice import PeakChoice, memory_bandwidth
from ._recorder import StepRecorder
from ._run_review import RunReview
from ._window import Window, combine_ranks, read_place
from .attribution import Breakdown
from .diagnostics import Diagnosis, Diagnostics
from .flops import FlopEngine
from .parallelism import Parallelism
from .timer import StepTimer

if TYPE_CHECKING:
    from .hardware import PeakInfo

logger = logging.getLogger("mfu_callbacks")


class MFUMeter(GenerationHooks, RunSoFar):
    """Model FLOPs Utilization of a training loop, read at log time.

    Bracket every optimizer step with ``start_step(batch)`` and ``end_step()``, report further
    micro-batches of the step (gradient accumulation) with ``add_batch(batch)``, and read
    ``metrics()`` when logging (on every rank at once when distributed: it holds a collective).

    model: what the FLOP engine introspects (any wrapper: DDP, FSDP, PEFT, compiled).
    options, or its measuring fields as keyword arguments (``MeterKeywords``: ``peak_tflops``,
        ``dtype``, ``warmup_steps``, ...): what each means and accepts is said once, in ``MFUOptions``.
    run_dtype: the precision the training framework runs in (HF ``bf16=True``, Lightning's
        ``precision``): the dtype of the matmuls that do not run in fp8; detected when omitted.
    device: where the model computes; default: the device of its first parameter.
    world_size: GPUs sharing the work; default: the process group's size. Without a process group
        the other ranks are assumed to do what this one does.
    engine / timer / peak: ready-made parts, for integrations that build them and for tests.

    Every value is checked here (by ``MFUOptions``): a bad one raises ValueError naming it, before
    training starts.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        run_dtype: str | torch.dtype | None = None,
        device: torch.device | str | None = None,
        world_size: int | None = None,
        engine: FlopEngine | None = None,
        timer: StepTimer | None = None,
        peak: PeakInfo | None = None,
        options: MFUOptions | None = None,
        **keywords: Unpack[MeterKeywords],
    ) -> None:
        self.options = options = meter_options(options, keywords)
        self.device = torch.device(device) if device is not None else device_of(model)
        self._timer = timer if timer is not None else StepTimer(options.warmup_steps, device=self.device)
        self._diagnostics = Diagnostics(options.silence_diagnostics)
        self._peaks = PeakChoice(model, self.device, options, _validate.compute_dtype(run_dtype), peak)
        self._model = model
        self._recorder = StepRecorder(
            model, self._timer, engine, options.forward, options.token_counter, options.real_step
        )
        self._generation = generation_phase(model, self._timer, self.device)
        # Bytes/s of one GPU's memory (datasheet), for the generation's bandwidth utilization; None on a CPU.
        self.memory_bandwidth: float | None = memory_bandwidth(self.device)
        self._profile = profiled_steps(model, self.device, options)
        self._profiling = False  # whether the open step is profiled
        self._steps_ended = 0  # where a read is in the run (``read_place``), unless the caller says
        review = RunReview(self._diagnostics, model, self._peaks, self._profile)
        self._reader = WindowReader(
            model,
            self.device,
            _validate.optional_whole_number(world_size, name="world_size", minimum=1),
            self._timer,
            self._recorder,
            self._generation,
            self._peaks,
            self._diagnostics,
            review,
        )

    @property
    def peak(self) -> PeakInfo | None:
        """The dense peak of one GPU that MFU divides by (``PeakChoice``); None when unknown."""
        return self._peaks.peak

    @property
    def engine(self) -> FlopEngine | None:
        """The FLOP engine, built from the first batch that can be counted."""
        return self._recorder.engine

    # -- per step (hot path: no host sync) -------------------------------------------------------
    def start_step(self, batch: Any = None) -> None:
        """An optimizer step begins; ``batch`` is its first micro-batch, if known yet."""
        self._profiling = self._profile is not None and profile_step_begins(
            self._profile, self._recorder, self._timer, self._peaks
        )  # begin, go on with or end the profiling at this step boundary
        self._generation.step_begins()
        self._recorder.start_step(batch)
        if self._profiling:
            self._recorder.leave_out_open_step()  # the profiler and its syncs slow the step
            if batch is not None:
                self._profile.add_batch(batch, self.engine)  # type: ignore[union-attr]

    def add_batch(self, batch: Any) -> None:
        """Another micro-batch of the open step (gradient accumulation): its FLOPs add to the step's.

        A batch the engine cannot count leaves its step out of the measurement (said once in the log).
        """
        self._recorder.add_batch(batch)
        if self._profiling:
            self._profile.add_batch(batch, self.engine)  # type: ignore[union-attr]

    def add_forward(self, batch: Any, *, other_model: bool = False) -> None:
        """A forward without grad inside the open step (a reference model, a KL or scoring pass):
        not a micro-batch of its own; its FLOPs are counted through the step's observation, which
        opens here when the pass comes before the step's first training micro-batch.
        ``other_model``: the pass is of another model than the meter's (one the trainer built)."""
        self._recorder.add_forward(batch, other_model=other_model)

    @property
    def awaits_first_pass(self) -> bool:
        """Whether the open step is to be observed from its first pass on, and none has run yet."""
        return self._recorder.awaits_first_pass

    def end_step(self) -> None:
        """The optimizer step ends (its kernels may still run: they are timed by events)."""
        self._steps_ended += 1
        self._generation.step_ends(measured=self._timer.measuring)
        self._recorder.end_step()
        if self._profiling:
            self._profile.step_ends()  # type: ignore[union-attr]

    def step_breakdown(self) -> Breakdown | None:
        """Where the profiled steps' time went (``profile_steps``), once the profiling ended; else None.

        A run that ends inside the profiled steps ends the profiling here. Once measured steps were read, the
        breakdown is that of their mean step (``attribution.calibrated``): the profiled kernels' times,
        and the idle time the measured step leaves.
        """
        if self._profile is None:
            return None
        return step_breakdown(self._profile, self._peaks, self._reader.run.mean_iteration_seconds)

    @property
    def profile_note(self) -> str | None:
        """Why no breakdown was taken (profiler unavailable or busy, analysis failed), or None."""
        return self._profile.skipped if self._profile is not None else None

    def stop_observing(self) -> None:
        """Stop watching the real step, if a step is being observed (a run ends or fails)."""
        self._recorder.stop_observing()

    # -- at log time -----------------------------------------------------------------------------
    def own_work(self) -> AbstractContextManager[None]:
        """Around the meter's own work between two steps (a read, and what an integration does with
        its metrics): counted in the wall clock as the meter's time, never as input wait."""
        return self._timer.meter_work()

    def not_training(self) -> AbstractContextManager[None]:
        """Around work between two steps that is not training (evaluation, a checkpoint save): its time
        is neither step time nor input wait, so it never counts in MFU or as waiting for input."""
        return self._timer.paused()

    def metrics(self, *, read_at: int | None = None) -> dict[str, float]:
        """Values over the steps finished since the last read (after warm-up); {} when there are none.

        On one process the read does not wait for the GPU: steps whose work is still queued on it are
        left for the next read (so a window can end a step or two before the step at which it was
        read). When distributed, the ranks' reduction waits for the GPU anyway, and every rank reads
        every finished step, so that all ranks' windows hold the same steps. The keys and their
        meaning are listed in :mod:`mfu_callbacks.metrics`.

        ``read_at``: the optimizer steps the caller ended before this read (the same on every rank; an
        integration passes its own count); default: those this meter ended. Ranks whose reads are at
        different steps were called out of step: the read raises ``ReductionError`` on all of them.
        """
        window = self._read_window(wait=distributed.is_distributed(), read_at=read_at)
        if window is None:
            return {}
        if window.failed_ranks:
            # Some rank could not count: MFU of the others alone would pass for the whole job's.
            window = replace(window, counting_ranks=0.0)
        return metrics.window_metrics(
            window,
            self._peak_flops(),
            distributed=distributed.is_distributed(),
            bandwidth=self.memory_bandwidth,
        )

    def summary(self, *, read_at: int | None = None) -> dict[str, float]:
        """Means over the whole run after warm-up: mfu, hfu, tflops_per_gpu, tokens_per_sec_per_gpu.

        Reads the steps not yet read first (waiting for the GPU to finish them), so when distributed it
        holds the same collective as ``metrics()``: call it on every rank (``read_at`` as there).
        """
        self._read_window(wait=True, final=True, read_at=read_at)
        run, reviewed = self._reader.run, self._reader.reviewed
        if run.steps and (reviewed is None or reviewed[0] != run.steps):
            self._reader.diagnose(force=True)  # the run as it ends is reviewed, however little it grew
        return metrics.run_summary(run, self._peak_flops())

    @property
    def parallelism(self) -> Parallelism:
        """How the job splits its work (data-parallel size, TP/FSDP degrees), read from the model once.

        Read at the first metrics read, when every wrapper (FSDP, DTensor parameters) is in place.
        """
        return self._reader.parallelism

    @property
    def last_window(self) -> Window | None:
        """The window of the latest read, all ranks combined."""
        return self._reader.last_window

    def diagnostics(self) -> list[Diagnosis]:
        """Every diagnosis fired so far (each at most once per run); checked when metrics are read."""
        return list(self._diagnostics.fired)

    def _read_window(self, *, wait: bool, final: bool = False, read_at: int | None = None) -> Window | None:
        """Read the finished steps (``WindowReader.read``) at this place in the run."""
        place = read_place(self._steps_ended if read_at is None else read_at, final=final)
        return self._reader.read(place, wait=wait)


def join_reduction_as_failed(
    world_size: int | None = None, *, read_at: int | None = None, final: bool = False
) -> None:
    """Enter the reduction of a metrics read as a rank that has nothing to report (its meter failed).

    ``read_at``: the optimizer steps ended before the read, as the other ranks count them (None: no
    say in the check that all ranks are at the same read)."""
    place = read_place(read_at, final=final) if read_at is not None else -math.inf
    combine_ranks(Window(world_size=world_size or distributed.world_size(), failed_ranks=1.0, read_at=place))


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first real parameter; the CPU when it has none."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
