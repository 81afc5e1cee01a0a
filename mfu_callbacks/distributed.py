"""The little the meter needs from torch.distributed: who we are, and one reduction at log time.

Nothing here runs per step. At log time every rank packs its window into two short float64
vectors; one all-reduce sums the first (FLOPs, tokens, seconds) and one takes the maximum of the
second (the slowest rank's time; a minimum travels as a negated maximum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a default process group is up (the meter then reduces across its ranks)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and MPI reduce CPU tensors."""
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_and_max_over_ranks(sums: Sequence[float], maxima: Sequence[float]) -> tuple[list[float], list[float]]:
    """Element-wise sum of ``sums`` and maximum of ``maxima`` over all ranks (identity without a group).

    Every rank must call this at the same point with vectors of the same lengths, like any collective.
    """
    if not is_distributed():
        return list(sums), list(maxima)
    device = _collective_device()
    summed = torch.tensor(sums, dtype=torch.float64, device=device)
    largest = torch.tensor(maxima, dtype=torch.float64, device=device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    values = torch.cat([summed, largest]).tolist()  # one copy back to the host
    return values[: len(sums)], values[len(sums) :]
