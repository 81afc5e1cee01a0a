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
tensor on the batch's device) into a buffer on that device: nothing waits for the GPU. At log
time one copy brings the counts of all pending steps to the host, the FLOP engine turns them into
FLOPs, and one reduction combines the ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import distributed
from ._run_totals import RunTotals, per_gpu_per_second, utilization
from .diagnostics import Diagnosis, Diagnostics
from .flops import FlopEngine, Forward, StepFlops, TokenCounter
from .precision import active_autocast_dtype
from .timer import StepTimer

if TYPE_CHECKING:
    from .hardware import PeakInfo

logger = logging.getLogger("mfu_callbacks")

_INITIAL_STEP_ROWS = 64  # steps between two reads before the count buffer grows


@dataclass(frozen=True)
class _Window:
    """The measured steps since the last read: of this rank, or of all ranks once combined."""

    world_size: int
    model_flops: float
    hardware_flops: float
    tokens: float
    padded_tokens: float
    step_seconds: float
    input_wait_seconds: float
    counting_ranks: float  # ranks whose FLOP engine counted batches (1 or 0 for one rank)
    last_model_flops: float  # the last step alone
    last_hardware_flops: float
    wall_seconds: float  # step + input wait seconds of the slowest rank (the others wait for it)
    steps: float
    # Mean step time (without input wait) of the slowest and fastest rank. Under synchronous data
    # parallelism a rank that is late with its batch makes the others wait inside their steps (in
    # the gradient all-reduce): the spread of step times, not of iteration times, shows it.
    step_time_max: float
    step_time_min: float
    last_step_seconds: float


# How the fields of a window combine over ranks (world_size is the same on every rank).
_SUMMED_OVER_RANKS = (
    "model_flops",
    "hardware_flops",
    "tokens",
    "padded_tokens",
    "step_seconds",
    "input_wait_seconds",
    "counting_ranks",
    "last_model_flops",
    "last_hardware_flops",
)
_SLOWEST_RANK = ("wall_seconds", "steps", "step_time_max", "last_step_seconds")
_FASTEST_RANK = ("step_time_min",)  # a maximum over negated values


def _combine_ranks(local: _Window) -> _Window:
    """The window of all ranks, through one summing and one maximising all-reduce."""
    sums = [getattr(local, name) for name in _SUMMED_OVER_RANKS]
    maxima = [getattr(local, name) for name in _SLOWEST_RANK] + [
        -getattr(local, name) for name in _FASTEST_RANK
    ]
    sums, maxima = distributed.sum_and_max_over_ranks(sums, maxima)
    slowest, negated_fastest = maxima[: len(_SLOWEST_RANK)], maxima[len(_SLOWEST_RANK) :]
    return replace(
        local,
        **dict(zip(_SUMMED_OVER_RANKS, sums)),
        **dict(zip(_SLOWEST_RANK, slowest)),
        **{name: -value for name, value in zip(_FASTEST_RANK, negated_fastest)},
    )


def _assume_matching_ranks(local: _Window) -> _Window:
    """The window of all ranks when there is no process group to ask: the others did what this one did."""
    return replace(local, **{name: getattr(local, name) * local.world_size for name in _SUMMED_OVER_RANKS})


class MFUMeter:
    """Model FLOPs Utilization of a training loop, read at log time.

    Bracket every optimizer step with ``start_step(batch)`` and ``end_step()``, report further
    micro-batches of the step (gradient accumulation) with ``add_batch(batch)``, and read
    ``metrics()`` when logging (on every rank at once when distributed: it holds a collective).

    model: what the FLOP engine introspects (any wrapper: DDP, FSDP, PEFT, compiled).
    peak_tflops: dense peak TFLOP/s of one GPU, for hardware the table does not know (or to override it).
    dtype: the precision the matmuls run in ("bf16", "fp16", "tf32", "fp32", "fp8" or a torch dtype);
        detected from the model when omitted.
    warmup_steps: optimizer steps left out of every average (compilation, allocator warm-up).
    forward / token_counter: passed to the FLOP engine for models or batches it cannot read alone.
    device: where the model computes; default: the device of its first parameter.
    world_size: GPUs sharing the work; default: the process group's size. Without a process group
        the other ranks are assumed to do what this one does.
    engine / timer / peak: ready-made parts, for integrations that build them and for tests.
    silence_diagnostics: ids of diagnoses never to report (see ``mfu_callbacks.diagnostics``);
        an unknown id raises ValueError.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        peak_tflops: float | None = None,
        dtype: str | torch.dtype | None = None,
        warmup_steps: int = 2,
        forward: Forward | None = None,
        token_counter: TokenCounter | None = None,
        device: torch.device | str | None = None,
        world_size: int | None = None,
        engine: FlopEngine | None = None,
        timer: StepTimer | None = None,
        peak: PeakInfo | None = None,
        silence_diagnostics: Iterable[str] = (),
    ) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")
        if peak_tflops is not None and not (isinstance(peak_tflops, (int, float)) and peak_tflops > 0):
            raise ValueError(f"peak_tflops must be a positive number of TFLOP/s per GPU, got {peak_tflops!r}")
        if world_size is not None and not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"world_size must be a whole number >= 1 or None, got {world_size!r}")
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.engine = engine
        self.peak = peak if peak is not None else _resolve_peak(model, self.device, dtype, peak_tflops)
        self._model = model
        self._peak_tflops = peak_tflops
        self._forward = forward
        self._token_counter = token_counter
        self._world_size_given = world_size
        self._dtype_given = dtype
        self._diagnostics = Diagnostics(silence_diagnostics)
        self._forward_seen = False
        self._autocast_dtype: str | None = None  # autocast's dtype at the first forward, None without autocast
        self._timer = timer if timer is not None else StepTimer(warmup_steps, device=self.device)
        self._step_open = False
        self._steps_unread = 0  # measured steps finished since the last read: the rows in use below
        self._counts: torch.Tensor | None = None  # (rows, 2, NUM_FEATURES) feature sums, one row per step
        self._count_rows: list[torch.Tensor] = []  # views of its rows, so the hot path does no indexing
        self._run = RunTotals()
        self._run_features: torch.Tensor | None = None  # summed features of every step read so far
        # Autocast is entered around the forward, after the meter is built: look once, at the first
        # forward, and (unless the dtype was given) pick the peak of the dtype the matmuls really run in.
        self._resolve_peak_at_first_forward = dtype is None and peak is None
        self._autocast_probe: torch.utils.hooks.RemovableHandle | None = model.register_forward_pre_hook(
            self._see_autocast
        )

    @torch.compiler.disable
    def _see_autocast(self, module: nn.Module, args: Any) -> None:
        if self._autocast_probe is not None:
            self._autocast_probe.remove()
            self._autocast_probe = None
        self._forward_seen = True
        self._autocast_dtype = active_autocast_dtype(self.device)
        if not self._resolve_peak_at_first_forward:
            return
        try:
            from .precision import detect_compute_dtype

            if self.peak is not None and detect_compute_dtype(module, device=self.device) != self.peak.dtype:
                self.peak = _resolve_peak(module, self.device, None, self._peak_tflops)
        except Exception:  # noqa: BLE001 - a failed look keeps the peak found at construction
            pass

    # -- per step (hot path: no host sync) -------------------------------------------------------
    def start_step(self, batch: Any = None) -> None:
        """An optimizer step begins; ``batch`` is its first micro-batch, if known yet."""
        if self._step_open:
            raise ValueError(
                "start_step() called while a step is open: call end_step() after each optimizer step"
            )
        self._step_open = True
        self._timer.start()
        if batch is not None:
            self._count(batch)

    def add_batch(self, batch: Any) -> None:
        """Another micro-batch of the open step (gradient accumulation): its FLOPs add to the step's."""
        if not self._step_open:
            raise ValueError(
                "add_batch() called outside a step: call start_step() at the beginning of each optimizer step"
            )
        if batch is None:
            raise TypeError("add_batch() needs the micro-batch the model was given, got None")
        self._count(batch)

    def end_step(self) -> None:
        """The optimizer step ends (its kernels may still run: they are timed by events)."""
        if not self._step_open:
            raise ValueError(
                "end_step() called without start_step(): call start_step() at the beginning of each optimizer step"
            )
        self._step_open = False
        if self._timer.measuring:
            self._steps_unread += 1
        self._timer.stop()

    def _count(self, batch: Any) -> None:
        if self.engine is None:
            self.engine = FlopEngine.from_model(
                self._model, batch, forward=self._forward, token_counter=self._token_counter
            )
            self._timer.discard_current()  # this step's time went into building the engine, not into training
            return
        if not self._timer.measuring:
            return  # warm-up: nothing to count
        features = self.engine.count(batch)
        row_index = self._steps_unread
        if row_index >= len(self._count_rows):
            self._grow_counts(features, row_index)
        row = self._count_rows[row_index]
        if features.device != row.device:
            features = features.to(row.device, non_blocking=True)
        row.add_(features)

    def _grow_counts(self, features: torch.Tensor, row_index: int) -> None:
        rows = max(_INITIAL_STEP_ROWS, 2 * len(self._count_rows))
        while rows <= row_index:
            rows *= 2
        grown = torch.zeros((rows, *features.shape), dtype=features.dtype, device=features.device)
        if self._counts is not None:
            grown[: len(self._counts)].copy_(self._counts)
        self._counts = grown
        self._count_rows = list(grown.unbind(0))

    # -- at log time -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Averages over the steps finished since the last read (after warm-up); {} when there are none.

        Averages are totals over totals (FLOPs over seconds), not means of per-step ratios. Seconds
        are iteration time: each step and the input wait before it, so a stalled data loader lowers
        MFU (and shows in ``input_wait_fraction``). MFU and
        HFU are fractions in [0, 1], left out when the peak is unknown. ``*_last_step`` is the last
        step alone; ``step_time_max``/``step_time_min`` compare the ranks' mean step times (input wait
        excluded) when distributed: a rank late with its batches makes the others wait inside their steps.
        """
        window = self._read_window()
        if window is None:
            return {}
        peak_flops = self.peak.flops if self.peak is not None else None
        wall, world = window.wall_seconds, window.world_size
        values: dict[str, float] = {}
        if window.counting_ranks:
            if peak_flops:
                values["mfu"] = utilization(window.model_flops, wall, world, peak_flops)
                values["hfu"] = utilization(window.hardware_flops, wall, world, peak_flops)
            values["tflops_per_gpu"] = per_gpu_per_second(window.model_flops, wall, world) / 1e12
            values["tokens_per_sec"] = window.tokens / wall
            values["tokens_per_sec_per_gpu"] = per_gpu_per_second(window.tokens, wall, world)
            padded = window.padded_tokens
            values["padding_fraction"] = 1.0 - window.tokens / padded if padded else 0.0
            if peak_flops and window.last_step_seconds > 0:
                last = window.last_step_seconds
                values["mfu_last_step"] = utilization(window.last_model_flops, last, world, peak_flops)
                values["hfu_last_step"] = utilization(window.last_hardware_flops, last, world, peak_flops)
        values["step_time"] = wall / window.steps
        busy_and_waiting = window.step_seconds + window.input_wait_seconds
        values["input_wait_fraction"] = (
            window.input_wait_seconds / busy_and_waiting if busy_and_waiting else 0.0
        )
        if distributed.is_distributed():
            values["step_time_max"] = window.step_time_max
            values["step_time_min"] = window.step_time_min
        return values

    def summary(self) -> dict[str, float]:
        """Means over the whole run after warm-up: mfu, hfu, tflops_per_gpu, tokens_per_sec_per_gpu.

        Reads the steps not yet read first, so when distributed it holds the same collective as
        ``metrics()``: call it on every rank.
        """
        self._read_window()
        run = self._run
        if not run.counted or run.wall_seconds <= 0:
            return {}
        values: dict[str, float] = {}
        if self.peak is not None and self.peak.flops:
            values["mfu"] = run.utilization(run.model_flops, self.peak.flops)
            values["hfu"] = run.utilization(run.hardware_flops, self.peak.flops)
        values["tflops_per_gpu"] = (
            per_gpu_per_second(run.model_flops, run.wall_seconds, run.world_size) / 1e12
        )
        values["tokens_per_sec_per_gpu"] = per_gpu_per_second(run.tokens, run.wall_seconds, run.world_size)
        return values

    def run_flops(self) -> StepFlops | None:
        """This rank's FLOPs over every measured step read so far (with the per-component breakdown)."""
        if self._run_features is None or self.engine is None:
            return None
        return self.engine.evaluate(self._run_features)

    def diagnostics(self) -> list[Diagnosis]:
        """Every diagnosis fired so far (each at most once per run); checked when metrics are read."""
        return list(self._diagnostics.fired)

    def _read_window(self) -> _Window | None:
        """Resolve the pending steps and combine the ranks; None when no rank finished a measured step."""
        world = self._world_size()
        with self._timer.paused():  # the GPU drain waited for here is not input wait
            if self._steps_unread:  # before the drain, while the GPU still runs the steps to be read
                self._diagnostics.sample_clock(self.device)
            local = self._local_window(world)
            if distributed.is_distributed():
                window = _combine_ranks(local)
            elif world > 1:
                window = _assume_matching_ranks(local)
            else:
                window = local
            if window.steps == 0 or window.wall_seconds <= 0:
                return None
            self._run.add(window)
            self._diagnose()
        return window

    def _diagnose(self) -> None:
        """Run the diagnoses on what was just read (host-side numbers only: no sync, no collective)."""
        try:
            self._diagnostics.review(
                self._run,
                model=self._model,
                engine=self.engine,
                run_features=self._run_features,
                peak_flops=self.peak.flops if self.peak is not None else None,
                compute_dtype=self._compute_dtype(),
                autocast_in_training=self._autocast_dtype is not None if self._forward_seen else None,
            )
        except Exception:  # noqa: BLE001 - diagnoses are advice: they never cost the run its metrics
            logger.debug("mfu_callbacks: diagnoses failed", exc_info=True)

    def _compute_dtype(self) -> str | None:
        """The dtype the matmuls run in: the peak's, else as given, seen under autocast, or stored."""
        if self.peak is not None:
            return self.peak.dtype
        from .precision import detect_compute_dtype

        try:
            return detect_compute_dtype(self._model, override=self._dtype_given or self._autocast_dtype, device=self.device)
        except (ValueError, RuntimeError):
            return None

    def _local_window(self, world: int) -> _Window:
        timings = self._timer.read()
        steps = len(timings)
        if steps != self._steps_unread:
            raise RuntimeError(f"the timer reported {steps} steps but the meter counted {self._steps_unread}")
        self._steps_unread = 0
        window_flops, last_flops = self._take_flops(steps)
        counting = window_flops is not None
        window_flops = window_flops or StepFlops(0, 0, 0, 0)
        last_flops = last_flops or StepFlops(0, 0, 0, 0)
        step_seconds = sum(timing.step_seconds for timing in timings)
        iteration_seconds = sum(timing.iteration_seconds for timing in timings)
        mean_step = step_seconds / steps if steps else None
        return _Window(
            world_size=world,
            model_flops=float(window_flops.model_flops),
            hardware_flops=float(window_flops.hardware_flops),
            tokens=float(window_flops.tokens),
            padded_tokens=float(window_flops.padded_tokens),
            step_seconds=step_seconds,
            input_wait_seconds=sum(timing.input_wait_seconds for timing in timings),
            counting_ranks=1.0 if counting else 0.0,
            last_model_flops=float(last_flops.model_flops),
            last_hardware_flops=float(last_flops.hardware_flops),
            wall_seconds=iteration_seconds,
            steps=float(steps),
            # A rank without steps has no say in which rank was slowest or fastest.
            step_time_max=mean_step if mean_step is not None else -math.inf,
            step_time_min=mean_step if mean_step is not None else math.inf,
            last_step_seconds=timings[-1].iteration_seconds if timings else 0.0,
        )

    def _take_flops(self, steps: int) -> tuple[StepFlops | None, StepFlops | None]:
        """FLOPs of the pending steps (all, and the last alone), with one device-to-host copy; clears them."""
        if steps == 0 or self._counts is None or self.engine is None:
            return None, None
        counts = self._counts
        used = min(steps, len(counts))  # steps that never counted a batch have no row (their counts are zero)
        window = counts[:used].sum(0)
        last = counts[steps - 1] if steps - 1 < len(counts) else torch.zeros_like(window)
        on_host = torch.stack([window, last]).cpu()
        self._run_features = on_host[0] if self._run_features is None else self._run_features + on_host[0]
        if self._step_open and steps < len(counts):  # the open step keeps what it has counted so far
            counts[0].copy_(counts[steps])
            counts[1 : steps + 1].zero_()
        else:
            counts[:used].zero_()
        return self.engine.evaluate(on_host[0]), self.engine.evaluate(on_host[1])

    def _world_size(self) -> int:
        if distributed.is_distributed():
            ranks = distributed.world_size()
            if self._world_size_given not in (None, ranks):
                raise ValueError(
                    f"world_size={self._world_size_given} but the process group has {ranks} ranks: "
                    "leave world_size unset when torch.distributed is initialised"
                )
            return ranks
        return self._world_size_given or 1


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _resolve_peak(
    model: nn.Module, device: torch.device, dtype: str | torch.dtype | None, peak_tflops: float | None
) -> PeakInfo | None:
    """The dense peak of one GPU at the dtype the matmuls run in; None (after a warning) when unknown."""
    from .hardware import resolve_peak
    from .precision import detect_compute_dtype

    compute_dtype = detect_compute_dtype(model, override=dtype, device=device)
    return resolve_peak(device, compute_dtype, override_tflops=peak_tflops)
