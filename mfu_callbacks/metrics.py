"""Every key the callbacks log, and how each is computed from a measurement window.

Logged at each read (``MFUMeter.metrics()``; the integrations prepend their prefix, ``train/``):

=========================  ==============================================================================
key                        meaning
=========================  ==============================================================================
``mfu``                    model FLOPs per GPU per second over the dense peak (a fraction); needs a peak
``hfu``                    the same with hardware FLOPs: padding and activation-checkpoint recompute included
``tflops_per_gpu``         model TFLOP/s achieved per GPU
``tokens_per_sec``         real (non-padding) tokens per second, all GPUs together (a batch that a
                           tensor-parallel group runs together counts once)
``tokens_per_sec_per_gpu`` the same per GPU
``step_time``              mean seconds per optimizer step, the input wait before it included
``padding_fraction``       share of computed tokens that were padding
``input_wait_fraction``    share of iteration time the device waited for the next batch
``mfu_last_step``          MFU of the window's last step alone
``hfu_last_step``          HFU of the window's last step alone
``step_time_max``          slowest data-parallel group's mean step time, input wait excluded (distributed runs
                           only); a group is the ranks that run one batch (tensor parallel), else one rank
``step_time_min``          fastest data-parallel group's mean step time, the same way
``mfu_status``             whether ``mfu`` is in the row, and if not why: a code of ``MFUStatus`` (``_status``)
=========================  ==============================================================================

Logged on the rows of trainers that generate inside the step (GRPO, RLOO, online DPO: ``generate``
timed and counted as a phase of its own, ``mfu_callbacks._generation``). ``mfu`` then covers every model
FLOP of the step, training and generation, over the whole step time (the wall clock):

======================================  =================================================================
key                                     meaning
======================================  =================================================================
``mfu/training``                        MFU of the training phase: the step's FLOPs but the generation's,
                                        over the step time but the generation's
``mfu/generation``                      MFU of the generation phase alone
``mfu/generation_time_fraction``        share of the step time spent generating
``mfu/generation_tokens_per_sec``       new tokens per second of generation, all GPUs together
``mfu/generation_flops``                model FLOPs of the generation per step and GPU
``mfu/generation_bandwidth_utilization`` bytes the generation read (every weight once per forward, the KV
                                        cache at every decode step) per second of generation over the
                                        GPU's datasheet memory bandwidth (``hardware.MEMORY_BANDWIDTH``);
                                        decode is bound by it, not by FLOPs
======================================  =================================================================

**Never overwritten, never overwriting**: where the trainer or the user already put one of these keys
in the logged row (TRL's GRPO and RLOO log their own ``step_time``), theirs stays and ours is logged
beside it with ``mfu/`` before the key, after the prefix (``mfu/step_time``; ``train/mfu/step_time``
under the prefix ``train/``), under that name for the rest of the run. HF Trainer: the ``logs`` dict
and ``state.log_history``; Lightning: the names the module or another callback logged with ``self.log``;
Accelerate: the values given to ``accelerator.log``.

**Evaluation and checkpoint saves are not training**: their time is left out of ``step_time`` and of
``input_wait_fraction`` (and of every time base), so neither MFU nor the ``input_bound`` diagnosis
counts them.

``mfu_status`` is added by the integrations at every read, from the first read on: its codes, with
their reasons and fixes, are listed in :mod:`mfu_callbacks._status` (``MFUStatus``).

The run summary (``MFUMeter.summary()``, the W&B summary under ``mfu_run/``) holds ``mfu``, ``hfu``,
``tflops_per_gpu`` and ``tokens_per_sec_per_gpu`` over all measured steps.

Averages are totals over totals (FLOPs over seconds), never means of per-step ratios.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from ._status import MFUStatus as MFUStatus  # the codes of mfu_status, also read from here
from ._window import PeakFlops, RunTotals, Window, per_gpu_per_second, utilization

logger = logging.getLogger("mfu_callbacks")

MFU = "mfu"
HFU = "hfu"
TFLOPS_PER_GPU = "tflops_per_gpu"
TOKENS_PER_SEC = "tokens_per_sec"
TOKENS_PER_SEC_PER_GPU = "tokens_per_sec_per_gpu"
STEP_TIME = "step_time"
PADDING_FRACTION = "padding_fraction"
INPUT_WAIT_FRACTION = "input_wait_fraction"
MFU_LAST_STEP = "mfu_last_step"
HFU_LAST_STEP = "hfu_last_step"
STEP_TIME_MAX = "step_time_max"
STEP_TIME_MIN = "step_time_min"
MFU_STATUS = "mfu_status"
TRAINING_MFU = "mfu/training"
GENERATION_MFU = "mfu/generation"
GENERATION_TIME_FRACTION = "mfu/generation_time_fraction"
GENERATION_TOKENS_PER_SEC = "mfu/generation_tokens_per_sec"
GENERATION_FLOPS = "mfu/generation_flops"
GENERATION_BANDWIDTH_UTILIZATION = "mfu/generation_bandwidth_utilization"
RENAMED = "mfu/"  # before a key of ours that the trainer or the user logged too (after the prefix)


NUMERIC_METRICS = (
    MFU,
    HFU,
    TFLOPS_PER_GPU,
    TOKENS_PER_SEC,
    TOKENS_PER_SEC_PER_GPU,
    STEP_TIME,
    PADDING_FRACTION,
    INPUT_WAIT_FRACTION,
    MFU_LAST_STEP,
    HFU_LAST_STEP,
    STEP_TIME_MAX,
    STEP_TIME_MIN,
    TRAINING_MFU,
    GENERATION_MFU,
    GENERATION_TIME_FRACTION,
    GENERATION_TOKENS_PER_SEC,
    GENERATION_FLOPS,
    GENERATION_BANDWIDTH_UTILIZATION,
)
SUMMARY_METRICS = (MFU, HFU, TFLOPS_PER_GPU, TOKENS_PER_SEC_PER_GPU)


def placed_beside(
    row: Collection[str], metrics: Mapping[str, float], prefix: str, renamed: set[str]
) -> dict[str, float]:
    """``metrics`` (prefixed) as they go into a logged row that already holds the keys ``row``: never
    overwriting (see above). ``renamed``: our keys the trainer or the user logs too, grown here and kept
    for the rest of the run, so a curve never changes meaning. Where the ``mfu/`` name is taken too,
    ours is left out."""
    placed: dict[str, float] = {}
    for key, value in metrics.items():
        if key in row or key in renamed:
            if key not in renamed:
                renamed.add(key)
                logger.info("mfu_callbacks: %r is logged by the trainer too; ours is logged beside it", key)
            bare = key[len(prefix) :] if key.startswith(prefix) else key
            key = prefix + RENAMED + bare
            if key in row:
                continue
        placed[key] = value
    return placed


def window_metrics(
    window: Window, peak_flops: PeakFlops | None, *, distributed: bool, bandwidth: float | None = None
) -> dict[str, float]:
    """The logged values of one window, all ranks combined (see the tables above); ``peak_flops``: one
    peak, or one per dtype the matmuls ran in (``_window.utilization``); ``bandwidth``: the memory
    bandwidth of one GPU in bytes/s, for the generation's utilization of it."""
    wall, world = window.wall_seconds, window.world_size
    values: dict[str, float] = {}
    if window.counting_ranks:
        if peak_flops:
            values[MFU] = utilization(window.model_flops, wall, world, peak_flops, window.model_by_dtype)
            values[HFU] = utilization(
                window.hardware_flops, wall, world, peak_flops, window.hardware_by_dtype
            )
        values[TFLOPS_PER_GPU] = per_gpu_per_second(window.model_flops, wall, world) / 1e12
        values[TOKENS_PER_SEC] = window.tokens / wall
        values[TOKENS_PER_SEC_PER_GPU] = per_gpu_per_second(window.tokens, wall, world)
        padded = window.padded_tokens
        values[PADDING_FRACTION] = 1.0 - window.tokens / padded if padded else 0.0
        if peak_flops and window.last_step_seconds > 0:
            last = window.last_step_seconds
            values[MFU_LAST_STEP] = utilization(
                window.last_model_flops, last, world, peak_flops, window.last_model_by_dtype
            )
            values[HFU_LAST_STEP] = utilization(
                window.last_hardware_flops, last, world, peak_flops, window.last_hardware_by_dtype
            )
    values[STEP_TIME] = wall / window.steps
    iterations = window.step_seconds + window.input_wait_seconds + window.meter_seconds
    values[INPUT_WAIT_FRACTION] = window.input_wait_seconds / iterations if iterations else 0.0
    if distributed:
        values[STEP_TIME_MAX] = window.step_time_max
        values[STEP_TIME_MIN] = window.step_time_min
    if window.generation_seconds > 0:
        values.update(generation_metrics(window, peak_flops, bandwidth))
    return values


def generation_metrics(
    window: Window, peak_flops: PeakFlops | None, bandwidth: float | None
) -> dict[str, float]:
    """The phase split of a window whose steps generated (see the second table above).

    Generation seconds are summed over ranks, the wall is the slowest rank's: each GPU's generation
    time is their mean, and the training phase is the rest of the wall.
    """
    wall, world = window.wall_seconds, window.world_size
    generating = window.generation_seconds / world  # per GPU
    values = {GENERATION_TIME_FRACTION: min(generating / wall, 1.0)}
    if not window.counting_ranks:
        return values
    if window.generated_tokens:
        values[GENERATION_TOKENS_PER_SEC] = window.generated_tokens / generating
    values[GENERATION_FLOPS] = window.generation_model_flops / (world * window.steps)
    if peak_flops:
        generated = window.generation_model_flops
        by_dtype = window.model_by_dtype  # with a peak per dtype: generation is in the run's (slot 0)
        only_generated = (generated,) + (0.0,) * (len(by_dtype) - 1)
        values[GENERATION_MFU] = utilization(generated, generating, world, peak_flops, only_generated)
        training = window.model_flops - generated
        training_by_dtype = (by_dtype[0] - generated, *by_dtype[1:]) if by_dtype else ()
        if wall > generating:
            values[TRAINING_MFU] = utilization(
                training, wall - generating, world, peak_flops, training_by_dtype
            )
    if bandwidth and window.generation_bytes:
        values[GENERATION_BANDWIDTH_UTILIZATION] = (
            per_gpu_per_second(window.generation_bytes, generating, world) / bandwidth
        )
    return values


def run_summary(run: RunTotals, peak_flops: PeakFlops | None) -> dict[str, float]:
    """The run's means over every measured step; {} before any counted step."""
    if not run.counted or run.wall_seconds <= 0:
        return {}
    values: dict[str, float] = {}
    mfu, hfu = run.model_utilization(peak_flops), run.hardware_utilization(peak_flops)
    if mfu is not None and hfu is not None:
        values[MFU], values[HFU] = mfu, hfu
    values[TFLOPS_PER_GPU] = run.per_gpu_per_second(run.model_flops) / 1e12
    values[TOKENS_PER_SEC_PER_GPU] = run.per_gpu_per_second(run.tokens)
    return values
