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
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _validate, distributed, metrics, parallelism
from ._dtype_peaks import dtype_shares, peaks_by_dtype
from ._generation import GenerationPhase, GenerationWindow, generation_cost
from ._profile_window import ProfileWindow
from ._recorder import StepRecorder
from ._window import PeakFlops, RunTotals, Window, combine_ranks, pack, rank_window, read_place, unpack
from .attribution import Breakdown, calibrated
from .diagnostics import Diagnosis, Diagnostics
from .diagnostics.checks import MATMUL_ALIGNMENT
from .diagnostics.measured import MatmulTime
from .flops import FlopEngine, Forward, StepFlops, TokenCounter
from .flops.features import NUM_FEATURES
from .parallelism import Parallelism
from .precision import AutocastWatch, detect_compute_dtype
from .timer import StepTimer

if TYPE_CHECKING:
    from .hardware import PeakInfo

logger = logging.getLogger("mfu_callbacks")
_STATE_VERSION = 1
_REVIEW_GROWTH = 1.1  # the diagnoses are reviewed again once the measured steps grew by this factor


class MFUMeter:
    """Model FLOPs Utilization of a training loop, read at log time.

    Bracket every optimizer step with ``start_step(batch)`` and ``end_step()``, report further
    micro-batches of the step (gradient accumulation) with ``add_batch(batch)``, and read
    ``metrics()`` when logging (on every rank at once when distributed: it holds a collective).

    model: what the FLOP engine introspects (any wrapper: DDP, FSDP, PEFT, compiled).
    peak_tflops: dense peak TFLOP/s of one GPU, for hardware the table does not know (or to override it).
    dtype: the precision the matmuls run in ("bf16", "fp16", "tf32", "fp32", "fp8", a torch dtype or
        a Lightning precision string): every matmul is judged against that dtype's peak (torchtitan's
        convention is ``dtype="bf16"``, whatever the matmul dtype). Omitted, each matmul is judged
        against the peak of the dtype it runs in (fp8 linears beside bf16 attention: ``dtype_peaks``).
    run_dtype: the precision the training framework runs in (HF ``bf16=True``, Lightning's
        ``precision``): the dtype of the matmuls that do not run in fp8; detected when omitted.
    warmup_steps: optimizer steps left out of every average (compilation, allocator warm-up).
    forward / token_counter: passed to the FLOP engine for models or batches it cannot read alone.
    device: where the model computes; default: the device of its first parameter.
    world_size: GPUs sharing the work; default: the process group's size. Without a process group
        the other ranks are assumed to do what this one does.
    engine / timer / peak: ready-made parts, for integrations that build them and for tests.
    silence_diagnostics: ids of diagnoses never to report (see ``mfu_callbacks.diagnostics``).
    real_step: "check" (default): count a meta-device copy of the model, and check it against the
        first measured step as it really runs, whose count is used where the copy cannot be traced or
        disagrees (custom autograd backward, data-dependent routing); "only": count the real step
        alone; "off": never watch the real step.
    profile_steps: profile this many optimizer steps with ``torch.profiler`` and split their time into
        buckets (matmuls by component, attention, elementwise, optimizer, communication, idle GPU), with
        ranked advice (``step_breakdown()``); 0 (default) never profiles. Profiled steps are left out of
        the MFU averages.
    profile_start: the optimizer step (0-based) the profile starts at; default: the one after warm-up
        (later if the FLOP engine is not ready by then).

    Every value is checked here: a bad one raises ValueError naming it, before training starts.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        peak_tflops: float | None = None,
        dtype: str | torch.dtype | None = None,
        run_dtype: str | torch.dtype | None = None,
        warmup_steps: int = 2,
        forward: Forward | None = None,
        token_counter: TokenCounter | None = None,
        device: torch.device | str | None = None,
        world_size: int | None = None,
        engine: FlopEngine | None = None,
        timer: StepTimer | None = None,
        peak: PeakInfo | None = None,
        silence_diagnostics: Iterable[str] = (),
        real_step: str = "check",
        profile_steps: int = 0,
        profile_start: int | None = None,
    ) -> None:
        self._peak_tflops = _validate.peak_tflops(peak_tflops)
        _validate.env_peak_tflops()
        self._dtype_given = _validate.compute_dtype(dtype)
        self._run_dtype_given = _validate.compute_dtype(run_dtype)
        self._world_size_given = _validate.optional_whole_number(world_size, name="world_size", minimum=1)
        self.device = torch.device(device) if device is not None else device_of(model)
        self._timer = timer if timer is not None else StepTimer(warmup_steps, device=self.device)
        self._diagnostics = Diagnostics(silence_diagnostics)
        given = dtype if dtype is not None else run_dtype
        self.peak = peak if peak is not None else _resolve_peak(model, self.device, given, self._peak_tflops)
        self._dtype_peaks: tuple[FlopEngine, dict[str, PeakInfo] | None] | None = None  # for that engine
        self._model = model
        self._recorder = StepRecorder(
            model, self._timer, engine, forward, token_counter, _validate.real_step(real_step)
        )
        self._generation = GenerationPhase(
            model,
            uses_cuda_events=self._timer.uses_cuda_events,
            device=self.device if self._timer.uses_cuda_events else None,
            clock=self._timer.clock,
        )
        # Bytes/s of one GPU's memory (datasheet), for the generation's bandwidth utilization; None on a CPU.
        self.memory_bandwidth: float | None = _memory_bandwidth(self.device)
        self._profile = _profile_window(model, self.device, warmup_steps, profile_steps, profile_start)
        self._profiling = False  # whether the open step is profiled
        self._steps_ended = 0  # where a read is in the run (``read_place``), unless the caller says
        self._run = RunTotals()
        self.last_window: Window | None = None  # the window of the latest read, all ranks combined
        self._run_features: torch.Tensor | None = None  # summed features of every step read so far
        self._reviewed: tuple[float, bool] | None = (
            None  # (measured steps, profile pending) at the last review
        )
        self._parallelism: Parallelism | None = None  # read from the model at the first read
        # Autocast is entered around the forward, after the meter is built: look at the first forward
        # and (unless the dtype or peak was given) pick the peak of the dtype the matmuls really run in.
        self._repick_peak = given is None and peak is None
        self._autocast = AutocastWatch(model, self.device, on_first_forward=self._check_peak_dtype)

    def _check_peak_dtype(self, module: nn.Module) -> None:
        if (
            self._repick_peak
            and self.peak is not None
            and detect_compute_dtype(module, device=self.device) != self.peak.dtype
        ):
            self.peak = _resolve_peak(module, self.device, None, self._peak_tflops)
            self._dtype_peaks = None

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
            self._recorder.leave_step_out()  # the profiler and its syncs slow the step
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
        if window.finished or (not window.is_open and not self._recorder.ready_to_profile):
            return False
        with self._timer.paused():  # the syncs and the analysis are neither step time nor input wait
            return window.step_begins(self._timer.steps_started, self._profile_context)

    def _profile_context(self) -> tuple[float | None, int]:
        """The peak and the matmul size multiple the profile's advice is judged with, when it closes."""
        dtype = _compute_dtype(self)
        return (self.peak.flops if self.peak is not None else None), MATMUL_ALIGNMENT.get(dtype or "", 1)

    def step_breakdown(self) -> Breakdown | None:
        """Where the profiled steps' time went (``profile_steps``), once the window closed; else None.

        A run that ends inside the window closes it here. Once measured steps were read, the
        breakdown is that of their mean step (``attribution.calibrated``): the profiled kernels' times,
        and the idle time the measured step leaves.
        """
        window = self._profile
        if window is None:
            return None
        if window.is_open:
            window.close(*self._profile_context())
        if window.result is None:
            return None
        measured = self._run.mean_iteration_seconds
        return calibrated(window.result, measured) if measured > 0 else window.result

    def _measured_matmuls(self) -> dict[str, MatmulTime] | None:
        """Matmul time and FLOPs per step by component, from the profile window (once it closed)."""
        window = self._profile
        if window is None or window.result is None:
            return None
        result = self.step_breakdown()
        assert result is not None
        return {
            name: MatmulTime(seconds=bucket.seconds, flops=bucket.flops)
            for name, bucket in result.matmul_buckets().items()
            if bucket.flops
        }

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
        """The peak each matmul is judged against, by the engine's dtype key ("" for the run's dtype,
        "fp8"), when the step's matmuls run in dtypes of different peaks; None when ``peak`` judges
        them all: one dtype, a ``dtype`` given, a peak given by hand (it holds for one dtype), no peak."""
        engine = self.engine
        if engine is None or self.peak is None or self._dtype_given is not None:
            return None
        if self._dtype_peaks is None or self._dtype_peaks[0] is not engine:
            keys: frozenset[str] = getattr(engine, "dtypes", frozenset())  # a ready-made one: the run's alone
            peaks = peaks_by_dtype(self.peak, keys, lambda: _run_dtype(self))
            if not self._autocast.seen:  # the run's dtype is known at the first forward
                return peaks
            self._dtype_peaks = (engine, peaks)
        return self._dtype_peaks[1]

    def _peak_flops(self) -> PeakFlops | None:
        """What MFU divides by (``_window.utilization``): one peak, or one per dtype key."""
        peaks = self.dtype_peaks()
        if peaks is not None:
            return {key: info.flops for key, info in peaks.items()}
        return self.peak.flops if self.peak is not None else None

    def matmul_dtypes(self) -> dict[str, tuple[float, PeakInfo | None]]:
        """Per dtype the matmuls ran in ("bf16", "fp8", ...): its share of the model FLOPs read so far,
        and the peak it is judged against (None without a peak); {} before any counted step."""
        flops = self.run_flops()
        if flops is None or flops.model_flops <= 0:
            return {}
        return dtype_shares(flops, self.dtype_peaks(), self.peak, lambda: _run_dtype(self))

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
            try:
                self._parallelism = parallelism.detect(self._model)
            except Exception:  # noqa: BLE001 - an unreadable layout: each rank is its own data-parallel group
                logger.debug("mfu_callbacks: could not read the parallel layout", exc_info=True)
                rank = distributed.rank()
                self._parallelism = Parallelism(
                    world_size=distributed.world_size(),
                    data_parallel=distributed.world_size(),
                    batch_group=(rank,),
                )
        return self._parallelism

    def diagnostics(self) -> list[Diagnosis]:
        """Every diagnosis fired so far (each at most once per run); checked when metrics are read."""
        return list(self._diagnostics.fired)

    def join_as_failed(self, *, read_at: int | None = None, final: bool = False) -> None:
        """Take part in a read on a rank whose measurement failed, so the other ranks never wait for it."""
        steps = self._steps_ended if read_at is None else read_at
        join_reduction_as_failed(_world_size(self._world_size_given), read_at=steps, final=final)

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
        """Run the diagnoses on what was just read (host-side numbers only: no sync, no collective).

        They judge the run's totals, which a read moves little late in a run: they are reviewed when
        the measured steps grew by a tenth since the last review (every read early on, O(log steps)
        reviews over a run, so a read costs the same at step 10 and at step 100,000), when a profile
        window has just closed, and at the end of the run (``force``).
        """
        profile_pending = self._profile is not None and not self._profile.finished
        due = (
            force
            or self._reviewed is None
            or self._run.steps >= self._reviewed[0] * _REVIEW_GROWTH
            or profile_pending != self._reviewed[1]
        )
        if not due:
            return
        self._reviewed = (self._run.steps, profile_pending)
        try:
            dtype = _compute_dtype(self)
            self._diagnostics.review(
                self._run,
                model=self._model,
                engine=self.engine,
                run_features=self._run_features,
                peak_flops=self._peak_flops(),
                compute_dtype=dtype,
                autocast_in_training=self._autocast.enabled_at_first_forward,
                device_name=self.peak.device_name if self.peak is not None else None,
                measured_matmuls=self._measured_matmuls(),
                profile_pending=profile_pending,
            )
        except Exception:  # noqa: BLE001 - diagnoses are advice: they never cost the run its metrics
            logger.debug("mfu_callbacks: diagnoses failed", exc_info=True)

    def _local_window(self, world: int, wait: bool) -> Window:
        timings, counted = self._recorder.take(wait=wait)
        generated = self._generation.take(sum(timing.steps for timing in timings))
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
        features = self._run_features.tolist() if self._run_features is not None else None
        return {
            "version": _STATE_VERSION,
            "run": self._run.state_dict(),
            "run_features": features,
            "diagnoses": self._diagnostics.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` of an earlier run (before its first step is read)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"cannot resume MFU from state version {state.get('version')!r}: "
                f"this mfu-callbacks writes version {_STATE_VERSION}"
            )
        self._run = RunTotals.from_state_dict(state["run"])
        features = state.get("run_features")
        if features is not None:  # written before columns were appended (attention windows): they were 0
            features = [list(row) + [0] * (NUM_FEATURES - len(row)) for row in features]
        self._run_features = torch.tensor(features, dtype=torch.int64) if features is not None else None
        self._diagnostics.load_state_dict(state.get("diagnoses", []))


def _profile_window(
    model: nn.Module, device: torch.device, warmup_steps: int, steps: int, start: int | None
) -> ProfileWindow | None:
    steps = _validate.profile_steps(steps)
    start = _validate.optional_whole_number(start, name="profile_start", minimum=0)
    if not steps:
        return None
    return ProfileWindow(model, device, steps, start if start is not None else warmup_steps + 1)


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
    """The dtype the matmuls run in: the peak's, else as given, seen under autocast, or stored."""
    if meter.peak is not None:
        return meter.peak.dtype
    try:
        override = meter._dtype_given or meter._run_dtype_given or meter._autocast.dtype
        return detect_compute_dtype(meter._model, override=override, device=meter.device)
    except (ValueError, RuntimeError):
        return None


def _run_dtype(meter: MFUMeter) -> str:
    """The dtype of the matmuls that do not run in fp8: as the framework says, seen under autocast, or
    stored (the model's fp8 layers aside)."""
    override = meter._run_dtype_given or meter._autocast.dtype
    return detect_compute_dtype(meter._model, override=override, device=meter.device, fp8_layers=False)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first real parameter; the CPU when it has none."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _memory_bandwidth(device: torch.device) -> float | None:
    """Datasheet memory bandwidth of the GPU in bytes/s; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    from .hardware import memory_bandwidth

    found = memory_bandwidth(device)
    return found[0] if found is not None else None


def _resolve_peak(
    model: nn.Module, device: torch.device, dtype: str | torch.dtype | None, peak_tflops: float | None
) -> PeakInfo | None:
    """The dense peak of one GPU at the dtype the matmuls run in; None (after a warning) when unknown."""
    from .hardware import resolve_peak

    compute_dtype = detect_compute_dtype(model, override=dtype, device=device)
    return resolve_peak(device, compute_dtype, override_tflops=peak_tflops)
