"""The little the meter needs from torch.distributed: who we are, and one reduction at log time.

Nothing here runs per step. At log time every rank packs its window into two short float64
vectors; one all-reduce sums the first (FLOPs, tokens, seconds) and one takes the maximum of the
second (the slowest rank's time; a minimum travels as a negated maximum).

The reduction is a collective: every rank must enter it at the same read, or the ranks that did
wait. Two things keep a mistake (a read called on some ranks only, such as
``if accelerator.is_main_process: tracker.metrics()``) from hanging the job:

- the reduction runs on a process group of its own (gloo, made once per process group by
  ``prepare_reductions``, when a meter is attached on every rank) created with a timeout
  (``MFU_REDUCTION_TIMEOUT`` seconds, default 300): a reduction that some rank never enters fails
  after that time instead of waiting for ever, and never blocks the training's own collectives;
- each window carries the place of its read (see ``_window.pack``), and ranks that meet at
  different reads find it out.

After a failed reduction this process never enters one again (``reductions_broken``): the group may
be left half-way through an operation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("mfu_callbacks")

DEFAULT_REDUCTION_TIMEOUT_S = (
    300.0  # below NCCL's default 10-minute timeout of the training's own collectives
)
TIMEOUT_ENV = "MFU_REDUCTION_TIMEOUT"


class ReductionError(RuntimeError):
    """The ranks' reduction of a metrics read failed: timed out, or ranks met at different reads."""


# The reduction's own process group (None: the default group), and this process's reductions.
_group: dict[str, Any] = {"group": None}


class _Reductions:
    entered = 0  # reductions this process entered
    broken: str | None = None  # why reductions stopped after one failed


_state = _Reductions()


def is_distributed() -> bool:
    """Whether a default process group is up (the meter then reduces across its ranks)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def reduction_timeout() -> float:
    """Seconds a reduction waits for every rank (``MFU_REDUCTION_TIMEOUT``, default 300)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_REDUCTION_TIMEOUT_S
    except ValueError:
        value = DEFAULT_REDUCTION_TIMEOUT_S
    return value if 0 < value < 86_400 else DEFAULT_REDUCTION_TIMEOUT_S


def prepare_reductions() -> None:
    """Create the reduction's own gloo group with a timeout, unless one is up.

    Creating a group is itself collective: call this on every rank at the same point (the
    integrations do when they attach the meter, before the first step). Without gloo, the reduction
    runs on the default group and has no timeout of its own. ``release_reductions`` destroys it.
    """
    if not is_distributed() or _reduction_group() is not None:
        return
    try:
        _group["group"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=reduction_timeout()))
    except Exception:  # noqa: BLE001 - without a group of its own the reduction uses the default one
        logger.debug("mfu_callbacks: no gloo group for the metrics reduction", exc_info=True)


def release_reductions() -> None:
    """Destroy the reduction's group (the run ended on every rank: no reduction is in flight), so
    nothing of ours is left for the interpreter's exit to tear down. Not a collective."""
    group, _group["group"] = _reduction_group(), None
    if group is not None:
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - already gone with the default group
            logger.debug("mfu_callbacks: could not destroy the reduction's group", exc_info=True)


def _reduction_group() -> Any:
    """The reduction's own group while it is registered; None once destroyed (``destroy_process_group()``
    without arguments destroys every group) or never made."""
    group = _group["group"]
    if group is None or not is_distributed():
        _group["group"] = None
        return None
    try:
        dist.get_backend(group)  # raises for a group that is no longer registered
    except Exception:  # noqa: BLE001
        _group["group"] = None
        return None
    return group


def reductions_entered() -> int:
    """How many reductions this process has entered (a read checks that it entered exactly one)."""
    return _state.entered


def reductions_broken() -> str | None:
    """Why reductions stopped in this process after one failed (None while they work)."""
    return _state.broken


def _collective_device(group: Any) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and MPI reduce CPU tensors."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_and_max_over_ranks(sums: Sequence[float], maxima: Sequence[float]) -> tuple[list[float], list[float]]:
    """Element-wise sum of ``sums`` and maximum of ``maxima`` over all ranks (identity without a group).

    Every rank must call this at the same point with vectors of the same lengths, like any collective.
    It raises ``ReductionError`` when the ranks do not all arrive within the timeout; from then on
    (and after any other failure of the collective) this process enters no reduction again.
    """
    if not is_distributed():
        return list(sums), list(maxima)
    if _state.broken is not None:
        raise ReductionError(_state.broken)
    _state.entered += 1
    try:
        group = _reduction_group()
        device = _collective_device(group)
        summed = torch.tensor(sums, dtype=torch.float64, device=device)
        largest = torch.tensor(maxima, dtype=torch.float64, device=device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        values = torch.cat([summed, largest]).tolist()  # one copy back to the host
    except Exception as error:
        _state.broken = (
            f"the ranks' metrics reduction failed ({type(error).__name__}: {str(error)[:200]}); the likely "
            "cause: a read ran on some ranks only, or a rank stopped or died"
        )
        raise ReductionError(_state.broken) from error
    return values[: len(sums)], values[len(sums) :]


def reads_out_of_step(mine: float, earliest: float, latest: float) -> ReductionError:
    """The error of a reduction in which the ranks were at different reads."""
    _state.broken = (
        f"the ranks met at different metrics reads (this rank's read is at step {mine // 2:.0f}, "
        f"the others' between {earliest // 2:.0f} and {latest // 2:.0f}): a read ran on some ranks only"
    )
    return ReductionError(_state.broken)


def forget_reductions() -> None:
    """Forget this process's reduction groups and failures (tests that build process groups again)."""
    _group["group"] = None
    _state.entered = 0
    _state.broken = None
