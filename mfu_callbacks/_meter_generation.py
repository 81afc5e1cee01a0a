"""The meter's face for a generation inside the training step (GRPO, RLOO, online DPO: the phase itself
is ``_generation.py``): what a trainer with a generation phase calls, a part of ``MFUMeter``'s interface
on its own (a mixin, as Lightning's ``LightningModule`` is made of ``ModelHooks``, ``DataHooks`` and
``CheckpointHooks``)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from ._generation import GenerationPhase
from .timer import StepTimer


class GenerationHooks:
    """The generation methods of ``MFUMeter``; the meter builds ``_generation`` (``generation_phase``)."""

    _generation: GenerationPhase

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


def generation_phase(model: nn.Module, timer: StepTimer, device: torch.device) -> GenerationPhase:
    """The generation inside the step, timed as the steps are (CUDA events, or the timer's clock)."""
    events = timer.uses_cuda_events
    return GenerationPhase(
        model, uses_cuda_events=events, device=device if events else None, clock=timer.clock
    )
