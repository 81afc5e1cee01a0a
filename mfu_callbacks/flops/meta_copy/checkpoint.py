"""Activation checkpointing on the replica: torch's checkpoint routed to the recorder.

Every caller of ``torch.utils.checkpoint.checkpoint`` (transformers' layers hold it in a
``functools.partial``, FSDP's ``CheckpointWrapper`` too, user code imports it by name) is caught,
for the few meta-device forwards of a trace, and torch's own choice between the reentrant and
non-reentrant variants (``use_reentrant``) is left untouched. The recorder then marks which matmuls
the backward reruns. How the routing is done (it replaces two private names of
``torch.utils.checkpoint``) lives with the other private torch names in ``_torch_internals``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..._torch_internals import checkpoint_routed_to
from .trace import MatmulRecorder


@contextmanager
def checkpoint_to(current: list[MatmulRecorder]) -> Iterator[None]:
    """While active, checkpoint regions run once, recorded by ``current[0]``, the probe's recorder."""

    def reentrant(function, *args):
        return current[0].checkpoint_reentrant(function, *args)

    def non_reentrant(early_stop: bool):
        return current[0].recompute_region(early_stop=early_stop)

    with checkpoint_routed_to(reentrant, non_reentrant):
        yield
