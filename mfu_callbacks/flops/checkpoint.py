"""Activation checkpointing on the replica: torch's checkpoint routed to the recorder.

Every caller of ``torch.utils.checkpoint.checkpoint`` (transformers' layers hold it in a
``functools.partial``, FSDP's ``CheckpointWrapper`` too, user code imports it by name) ends in one
of two module-level names of ``torch.utils.checkpoint``: ``CheckpointFunction`` (reentrant) and
``_checkpoint_without_reentrant_generator`` (non-reentrant). Replacing those two, for the few
meta-device forwards of a trace, catches them all and leaves torch's own choice between the two
variants (``use_reentrant``) untouched. The recorder then marks which matmuls the backward reruns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.utils.checkpoint as torch_checkpoint

from .trace import MatmulRecorder

_NON_REENTRANT = "_checkpoint_without_reentrant_generator"


@contextmanager
def checkpoint_to(current: list[MatmulRecorder]) -> Iterator[None]:
    """While active, checkpoint regions run once, recorded by ``current[0]``, the probe's recorder."""
    original_function = torch_checkpoint.CheckpointFunction
    original_generator = getattr(torch_checkpoint, _NON_REENTRANT, None)
    signature = inspect.signature(original_generator) if original_generator is not None else None

    class Reentrant:
        @staticmethod
        def apply(function: Callable, preserve_rng_state: bool, *args):
            return current[0].checkpoint_reentrant(function, *args)

    def non_reentrant(function: Callable, *args, **kwargs):
        # torch <= 2.5 has no early_stop argument; the global switch overrides the argument where both exist
        early_stop = signature.bind(function, *args, **kwargs).arguments.get("early_stop", True) if signature else True
        override = getattr(torch_checkpoint, "_enable_checkpoint_early_stop", None)
        with current[0].recompute_region(early_stop=early_stop if override is None else override):
            yield  # checkpoint() runs the region between its two next() calls

    torch_checkpoint.CheckpointFunction = Reentrant
    if original_generator is not None:
        setattr(torch_checkpoint, _NON_REENTRANT, non_reentrant)
    try:
        yield
    finally:
        torch_checkpoint.CheckpointFunction = original_function
        if original_generator is not None:
            setattr(torch_checkpoint, _NON_REENTRANT, original_generator)
