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

Per step the meter records two timing events and adds the batch's token counts (a small int64
tensor on the batch's device) into a bounded buffer on that device: nothing waits for the GPU. At
log time the steps the GPU has finished are read (the others wait for the next read), one copy
brings their counts to the host, the FLOP engine turns them into FLOPs, and one reduction combines
the ranks. The read's own cost is part of the time base, which is the wall clock. The logged keys
are listed in ``mfu_callbacks.metrics``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Unpack

import torch
from torch import nn

from . import _validate, distributed, metrics, parallelism
from ._generation import GenerationPhase, GenerationWindow, generation_cost
from ._meter_profile import profile_step_begins, profile_window, step_breakdown
from ._meter_state import meter_state, read_meter_state
from ._options import MeterKeywords, MFUOptions, meter_options
from ._peak_choice import PeakChoice, memory_bandwidth
from ._profile_window import ProfileWindow
from ._recorder import StepRecorder
from ._run_review import RunReview
from ._window import PeakFlops, RunTotals, Window, combine_ranks, pack, rank_window, read_place, unpack
from .attribution import Breakdown
from .diagnostics import Diagnosis, Diagnostics
from .flops import FlopEngine, StepFlops
from .parallelism import Parallelism
from .timer import StepTimer

if TYPE_CHECKING:
    from .hardware import PeakInfo

logger = logging.getLogger("mfu_callbacks")


class MFUMeter:
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
        self._world_size_given = _validate.optional_whole_number(world_size, name="world_size", minimum=1)
        self.device = torch.device(device) if device is not None else device_of(model)
        self._timer = timer if timer is not None else StepTimer(options.warmup_steps, device=self.device)
        self._diagnostics = Diagnostics(options.silence_diagnostics)
        self._peaks = PeakChoice(model, self.device, options, _validate.compute_dtype(run_dtype), peak)
        self._model = model
        self._recorder = StepRecorder(
            model, self._timer, engine, options.forward, options.token_counter, options.real_step
        )
        self._generation = _generation_phase(model, self._timer, self.device)
        # Bytes/s of one GPU's memory (datasheet), for the generation's bandwidth utilization; None on a CPU.
        self.memory_bandwidth: float | None = memory_bandwidth(self.device)
        self._profile = profile_window(model, self.device, options)
        self._profiling = False  # whether the open step is profiled
        self._steps_ended = 0  # where a read is in the run (``read_place``), unless the caller says
        self._run = RunTotals()
        self.last_window: Window | None = None  # the window of the latest read, all ranks combined
        self._run_features: torch.Tensor | None = None  # summed features of every step read so far
        self._review = RunReview(self._diagnostics, model, self._peaks, self._profile)
        self._parallelism: Parallelism | None = None  # read from the model at the first read

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
        self._profiling = self._profile is not None and self._profile_step_begins(self._profile)
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

    def _profile_step_begins(self, window: ProfileWindow) -> bool:
        """Open, go on with or close the profile window at this step boundary; whether the step is profiled."""
        return profile_step_begins(window, self._recorder, self._timer, self._peaks)

    def step_breakdown(self) -> Breakdown | None:
        """Where the profiled steps' time went (``profile_steps``), once the window closed; else None.

        A run that ends inside the window closes it here. Once measured steps were read, the
        breakdown is that of their mean step (``attribution.calibrated``): the profiled kernels' times,
        and the idle time the measured step leaves.
        """
        if self._profile is None:
            return None
        return step_breakdown(self._profile, self._peaks, self._run.mean_iteration_seconds)

    @property
    def profile_note(self) -> str | None:
        """Why no breakdown was taken (profiler unavailable or busy, analysis failed), or None."""
        return self._profile.skipped if self._profile is not None else None

    def stop_observing(self) -> None:
        """Stop watching the real step, if a step is being observed (a run ends or fails)."""
        self._recorder.stop_observing()

    # -- generation inside the step (GRPO, RLOO, online DPO: ``_generation.py``) ---------------------------
    @property
    def generating(self) -> bool:
        """Whether a generation is running: its forwards are counted by the generation's formula, not as training."""
        return self._generation.running

    def generation_begins(self) -> None:
        """A generation inside the open step begins (``generation()`` around a block does both)."""
        self._generation.begins()

    def generation_ends(self) -> None:
        self._generation.ends()

    def generation(self) -> AbstractContextManager[None]:
        """Around a generation inside the step: timed apart (its time stays in the step's), no host sync."""
        return self._generation.timed()

    def add_generation(
        self,
        prompt_lengths: torch.Tensor | Sequence[int],
        completion_lengths: torch.Tensor | Sequence[int],
        *,
        padded_prompt: int | None = None,
        padded_completion: int | None = None,
    ) -> None:
        """Count a generation of the open step from its real prompt and completion lengths (one per
        generated sequence, end-of-sequence token included; tensors are not read back). ``padded_prompt``
        and ``padded_completion``: the padded shape it ran, for hardware FLOPs (None: no padding). This is
        how generators the meter cannot watch (vLLM) are counted, with the engine's forward formula."""
        self._generation.add(
            prompt_lengths,
            completion_lengths,
            padded_prompt=padded_prompt,
            padded_completion=padded_completion,
        )

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
        if self._run.steps and (self._reviewed is None or self._reviewed[0] != self._run.steps):
            self._diagnose(force=True)  # the run as it ends is reviewed, however little it grew
        return metrics.run_summary(self._run, self._peak_flops())

    # -- the peak of each dtype ----------------------------------------------------------------------
    def dtype_peaks(self) -> dict[str, PeakInfo] | None:
        """The peak of each dtype key when the matmuls run in dtypes of different peaks, else None
        (``PeakChoice.dtype_peaks``)."""
        return self._peaks.dtype_peaks(self.engine)

    def _peak_flops(self) -> PeakFlops | None:
        """What MFU divides by (``_window.utilization``): one peak, or one per dtype key."""
        return self._peaks.peak_flops(self.engine)

    def matmul_dtypes(self) -> dict[str, tuple[float, PeakInfo | None]]:
        """Per dtype the matmuls ran in ("bf16", "fp8", ...): its share of the model FLOPs read so far,
        and the peak it is judged against (None without a peak); {} before any counted step."""
        return self._peaks.matmul_dtypes(self.run_flops(), self.engine)

    def run_totals(self) -> dict[str, float]:
        """The sums the run summary divides (all ranks, every measured step read so far): the run
        summary file stores them, so that ``mfu-callbacks compare`` computes the report's figures."""
        totals = self._run.totals()
        if self.peak is not None:
            totals["peak_flops"] = float(self.peak.flops)
        return totals

    def run_flops(self) -> StepFlops | None:
        """This rank's FLOPs over every measured step read so far (with the per-component breakdown)."""
        features, engine = self._run_features, self.engine
        return engine.evaluate(features) if features is not None and engine is not None else None

    @property
    def parallelism(self) -> Parallelism:
        """How the job splits its work (data-parallel size, TP/FSDP degrees), read from the model once.

        Read at the first metrics read, when every wrapper (FSDP, DTensor parameters) is in place.
        """
        if self._parallelism is None:
            self._parallelism = _layout_of(self._model)
        return self._parallelism

    def diagnostics(self) -> list[Diagnosis]:
        """Every diagnosis fired so far (each at most once per run); checked when metrics are read."""
        return list(self._diagnostics.fired)

    def _read_window(self, *, wait: bool, final: bool = False, read_at: int | None = None) -> Window | None:
        """Resolve the finished steps (all of them with ``wait``, else those the GPU has passed) and
        combine the ranks; None when no rank finished a measured step.

        The invariant that keeps a distributed job from hanging, enforced here: **every rank enters
        exactly one reduction per read, whatever fails.** Everything before the collective (timing,
        resolving the steps, FLOPs, the layout, packing the vectors) is in one ``try``: a failure
        there sends a "failed" window instead, and is raised after the collective. The collective
        itself fails on every rank alike (``distributed.sum_and_max_over_ranks``: a timeout, ranks
        out of step), and what follows it only raises, entering nothing. The read's own time is
        counted in the wall clock (``StepTimer.meter_work``), not left out.
        """
        place = read_place(self._steps_ended if read_at is None else read_at, final=final)
        failure: Exception | None = None
        with ExitStack() as own_time:
            try:
                own_time.enter_context(self._timer.meter_work())  # in the wall clock, apart from input wait
                world = _world_size(self._world_size_given)
                # While the GPU may still run the steps to be read.
                if self._recorder.unread_steps:
                    self._diagnostics.sample_clock(self.device)
                local = self._local_window(world, wait)
                layout = self.parallelism
                local = replace(
                    local, group=layout.group_id, batch_replicas=layout.tensor_parallel, read_at=place
                )
                vectors = pack(local)
            except Exception as error:  # noqa: BLE001 - re-raised after the collective
                failure = error
                local = Window(world_size=distributed.world_size(), failed_ranks=1.0, read_at=place)
                vectors = pack(local)
            if distributed.is_distributed():
                reduced = distributed.sum_and_max_over_ranks(*vectors)  # the one collective of the read
                window = unpack(local, *reduced)
            else:
                window = combine_ranks(local)
            if failure is not None:
                raise failure
            if window.steps == 0 or window.wall_seconds <= 0:
                return None
            self._run.add(window)
            self.last_window = window
            self._diagnose()
            return window

    def _diagnose(self, *, force: bool = False) -> None:
        """Run the diagnoses on what was just read, when due (``RunReview``)."""
        self._review(self._run, self.engine, self._run_features, force=force)

    @property
    def _reviewed(self) -> tuple[float, bool] | None:
        """(measured steps, profile pending) at the last review of the diagnoses."""
        return self._review.last

    def _local_window(self, world: int, wait: bool) -> Window:
        timings, counted = self._recorder.drain(wait=wait)
        generated = self._generation.drain(sum(timing.steps for timing in timings))
        engine = self.engine
        if counted is None or engine is None:
            return replace(rank_window(world, timings, None, None), generation_seconds=generated.seconds)
        window, last = counted
        self._run_features = window if self._run_features is None else self._run_features + window
        local = rank_window(world, timings, engine.evaluate(window), engine.evaluate(last))
        return self._with_generation(local, generated, engine)

    def _with_generation(self, local: Window, generated: GenerationWindow, engine: FlopEngine) -> Window:
        """The window with its steps' generations: their time and cost, their FLOPs added to the step's."""
        if generated.features is None:
            return replace(local, generation_seconds=generated.seconds)
        dtype = _compute_dtype(self)
        cost = generation_cost(engine, self._model, generated.features, dtype)
        last = generation_cost(engine, self._model, generated.last, dtype) if generated.last else None

        def in_run_dtype(by_dtype: tuple[float, ...], flops: float) -> tuple[float, ...]:
            return (by_dtype[0] + flops, *by_dtype[1:])  # generation runs in the run's dtype (slot 0)

        return replace(
            local,
            model_by_dtype=in_run_dtype(local.model_by_dtype, cost.model_flops),
            hardware_by_dtype=in_run_dtype(local.hardware_by_dtype, cost.hardware_flops),
            last_model_by_dtype=in_run_dtype(local.last_model_by_dtype, last.model_flops if last else 0.0),
            last_hardware_by_dtype=in_run_dtype(
                local.last_hardware_by_dtype, last.hardware_flops if last else 0.0
            ),
            model_flops=local.model_flops + cost.model_flops,
            hardware_flops=local.hardware_flops + cost.hardware_flops,
            last_model_flops=local.last_model_flops + (last.model_flops if last else 0.0),
            last_hardware_flops=local.last_hardware_flops + (last.hardware_flops if last else 0.0),
            generation_seconds=generated.seconds,
            generation_model_flops=cost.model_flops,
            generation_hardware_flops=cost.hardware_flops,
            generated_tokens=cost.tokens,
            generation_bytes=cost.bytes_read,
        )

    # -- resuming ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this run's summary, as plain (JSON-able) values.

        The run totals, the FLOP features read so far and the diagnoses fired. Steps not yet read
        are not included (reading them would be a collective): at most one log interval. Warm-up is
        not carried over: a resumed process compiles and warms its allocator again.
        """
        return meter_state(self._run, self._run_features, self._diagnostics)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` of an earlier run (before its first step is read)."""
        run, self._run_features, diagnoses = read_meter_state(state)
        self._run = run
        self._diagnostics.load_state_dict(diagnoses)


def _generation_phase(model: nn.Module, timer: StepTimer, device: torch.device) -> GenerationPhase:
    """The generation inside the step, timed as the steps are (CUDA events, or the timer's clock)."""
    events = timer.uses_cuda_events
    return GenerationPhase(
        model, uses_cuda_events=events, device=device if events else None, clock=timer.clock
    )


def _layout_of(model: nn.Module) -> Parallelism:
    """How the job splits its work; each rank its own data-parallel group when the layout is unreadable."""
    try:
        return parallelism.detect(model)
    except Exception:  # noqa: BLE001 - an unreadable layout: each rank is its own data-parallel group
        logger.debug("mfu_callbacks: could not read the parallel layout", exc_info=True)
        world = distributed.world_size()
        return Parallelism(world_size=world, data_parallel=world, batch_group=(distributed.rank(),))


def join_reduction_as_failed(
    world_size: int | None = None, *, read_at: int | None = None, final: bool = False
) -> None:
    """Enter the reduction of a metrics read as a rank that has nothing to report (its meter failed).

    ``read_at``: the optimizer steps ended before the read, as the other ranks count them (None: no
    say in the check that all ranks are at the same read)."""
    place = read_place(read_at, final=final) if read_at is not None else -math.inf
    combine_ranks(Window(world_size=world_size or distributed.world_size(), failed_ranks=1.0, read_at=place))


def _world_size(given: int | None) -> int:
    """The process group's size; ``given`` (or 1) without one."""
    if distributed.is_distributed():
        ranks = distributed.world_size()
        if given not in (None, ranks):
            raise ValueError(
                f"world_size={given} but the process group has {ranks} ranks: "
                "leave world_size unset when torch.distributed is initialised"
            )
        return ranks
    return given or 1


def _compute_dtype(meter: MFUMeter) -> str | None:
    """The dtype the matmuls run in (``PeakChoice.compute_dtype``)."""
    return meter._peaks.compute_dtype()


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first real parameter; the CPU when it has none."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
