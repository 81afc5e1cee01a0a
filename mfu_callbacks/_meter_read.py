"""The meter's read (``MFUMeter.metrics`` and ``summary``): the finished steps resolved into this
rank's window, with their generations, the ranks combined in one collective, and the run's sums."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn

from . import distributed, parallelism
from ._generation import GenerationPhase, GenerationWindow, generation_cost
from ._peak_choice import PeakChoice
from ._recorder import StepRecorder
from ._run_review import RunReview
from ._window import RunTotals, Window, combine_ranks, pack, rank_window, unpack
from .diagnostics import Diagnostics
from .flops import FlopEngine
from .parallelism import Parallelism
from .timer import StepTimer

logger = logging.getLogger("mfu_callbacks")


class WindowReader:
    """Reads the steps finished since the last read, and keeps what the run read so far."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        world_size: int | None,
        timer: StepTimer,
        recorder: StepRecorder,
        generation: GenerationPhase,
        peaks: PeakChoice,
        diagnostics: Diagnostics,
        review: RunReview,
    ) -> None:
        self._model = model
        self._device = device
        self._world_size_given = world_size
        self._timer = timer
        self._recorder = recorder
        self._generation = generation
        self._peaks = peaks
        self._diagnostics = diagnostics
        self._review = review
        self.run = RunTotals()
        self.last_window: Window | None = None  # the window of the latest read, all ranks combined
        self.run_features: torch.Tensor | None = None  # summed features of every step read so far
        self._parallelism: Parallelism | None = None  # read from the model at the first read

    @property
    def parallelism(self) -> Parallelism:
        """How the job splits its work, read from the model once (at the first read, when every
        wrapper is in place)."""
        if self._parallelism is None:
            self._parallelism = _layout_of(self._model)
        return self._parallelism

    def read(self, place: float, *, wait: bool) -> Window | None:
        """Resolve the finished steps (all of them with ``wait``, else those the GPU has passed) and
        combine the ranks; None when no rank finished a measured step. ``place``: where the read is
        in the run (``read_place``), which every rank must share.

        The invariant that keeps a distributed job from hanging, enforced here: **every rank enters
        exactly one reduction per read, whatever fails.** Everything before the collective (timing,
        resolving the steps, FLOPs, the layout, packing the vectors) is in one ``try``: a failure
        there sends a "failed" window instead, and is raised after the collective. The collective
        itself fails on every rank alike (``distributed.sum_and_max_over_ranks``: a timeout, ranks
        out of step), and what follows it only raises, entering nothing. The read's own time is
        counted in the wall clock (``StepTimer.meter_work``), not left out.
        """
        failure: Exception | None = None
        many_ranks = distributed.is_distributed()
        with ExitStack() as own_time:
            try:
                own_time.enter_context(self._timer.meter_work())  # in the wall clock, apart from input wait
                world = _world_size(self._world_size_given)
                # While the GPU may still run the steps to be read.
                if self._recorder.unread_steps:
                    self._diagnostics.sample_clock(self._device)
                local = self._local_window(world, wait, place)
                vectors = pack(local) if many_ranks else None
            except Exception as error:  # noqa: BLE001 - re-raised after the collective
                failure = error
                local = Window(world_size=distributed.world_size(), failed_ranks=1.0, read_at=place)
                vectors = pack(local) if many_ranks else None
            if vectors is not None:
                reduced = distributed.sum_and_max_over_ranks(*vectors)  # the one collective of the read
                window = unpack(local, *reduced)
            else:
                window = combine_ranks(local)
            if failure is not None:
                raise failure
            if window.steps == 0 or window.wall_seconds <= 0:
                return None
            self.run.add(window)
            self.last_window = window
            self.diagnose()
            return window

    def diagnose(self, *, force: bool = False) -> None:
        """Run the diagnoses on what was just read, when due (``RunReview``)."""
        self._review(self.run, self._recorder.engine, self.run_features, force=force)

    @property
    def reviewed(self) -> tuple[float, bool, float] | None:
        """(measured steps, profile pending, measured seconds) at the last review of the diagnoses."""
        return self._review.last

    def _local_window(self, world: int, wait: bool, place: float) -> Window:
        """This rank's window of the steps drained now, placed in the job and in the run."""
        timings, counted = self._recorder.drain(wait=wait)
        steps = sum(timing.steps for timing in timings)
        generated = self._generation.drain(steps)
        engine = self._recorder.engine
        flops = last_flops = None
        if counted is not None and engine is not None:
            window, last = counted
            self.run_features = window if self.run_features is None else self.run_features + window
            flops = engine.evaluate(window)
            last_flops = flops if steps == 1 else engine.evaluate(last)  # a window of one step is its last
        layout = self.parallelism
        local = rank_window(
            world,
            timings,
            flops,
            last_flops,
            group=layout.group_id,
            batch_replicas=layout.tensor_parallel,
            read_at=place,
            generation_seconds=generated.seconds,
        )
        return (
            self._with_generation(local, generated, engine)
            if engine is not None and flops is not None
            else local
        )

    def _with_generation(self, local: Window, generated: GenerationWindow, engine: FlopEngine) -> Window:
        """The window with its steps' generations: their cost, their FLOPs added to the step's."""
        if generated.features is None:
            return local
        dtype = self._peaks.compute_dtype()
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
            generation_model_flops=cost.model_flops,
            generation_hardware_flops=cost.hardware_flops,
            generated_tokens=cost.tokens,
            generation_bytes=cost.bytes_read,
        )


def _layout_of(model: nn.Module) -> Parallelism:
    """How the job splits its work; each rank its own data-parallel group when the layout is unreadable."""
    try:
        return parallelism.detect(model)
    except Exception:  # noqa: BLE001 - an unreadable layout: each rank is its own data-parallel group
        logger.debug("mfu_callbacks: could not read the parallel layout", exc_info=True)
        world = distributed.world_size()
        return Parallelism(world_size=world, data_parallel=world, batch_group=(distributed.rank(),))


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
