"""Micro-batches seen by a forward pre-hook, for frameworks that hand callbacks no batch (HF Trainer,
Accelerate), and the generations of the model's ``generate`` inside a step (``_generation.py``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._generate_watch import GenerateWatch, generate_lengths
from ._guard import entry_point

if TYPE_CHECKING:
    from ._session import MeterSession


class ForwardWatch:
    """Counts each training forward of ``model`` as a micro-batch of the session's open step, and lets
    its forwards without grad inside the step (a reference, KL or scoring pass) open the step's
    observation when they come first. Its hooks run behind the session's guard."""

    def __init__(self, session: MeterSession, model: nn.Module) -> None:
        self.session = session
        self._model = model
        hook = torch.compiler.disable(self._before_forward)
        self._hook = model.register_forward_pre_hook(hook, with_kwargs=True)
        self._generate_watch = GenerateWatch(model, self._generation_begins, self._generation_ends)

    def remove(self) -> None:
        """Take the hooks off the model."""
        self._hook.remove()
        self._generate_watch.remove()

    @entry_point()
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward pre-hook (returns None: the call's arguments go through unchanged)."""
        session = self.session
        if self.generating:
            return  # a forward inside generate: counted by the generation phase, never as training
        if not module.training:
            if not session.step_open:
                session.pause()  # an evaluation between two steps: not training, until the next step
            return  # evaluation is not a training step
        if not torch.is_grad_enabled():
            if session.step_open and session.meter is not None:  # a pass without grad inside the step
                session.guard.run(session.meter.add_forward, _call_as_batch(module, args, kwargs))
            return
        if not session.step_open:
            session.begin_step()
        session.add_batch(_call_as_batch(module, args, kwargs))

    # -- generation inside the step: a phase of its own (``_generation.py``) -----------------------------
    @property
    def generating(self) -> bool:
        """Whether the watched model's ``generate`` is running (its forwards are not training forwards)."""
        meter = self.session.meter
        return meter is not None and not self.session.guard.failed and meter.generating

    @entry_point()
    def _generation_begins(self) -> None:
        """``generate`` was called: inside a step, its time is the generation phase's."""
        session = self.session
        if session.meter is not None and session.step_open and not session.guard.failed:
            session.meter.generation_begins()

    @entry_point()
    def _generation_ends(self, args: tuple, kwargs: dict, output: Any) -> None:
        """``generate`` returned (``output`` None: it raised): its time ends, its lengths are counted."""
        meter = self.session.meter
        if meter is None or not meter.generating or self.session.guard.failed:
            return
        meter.generation_ends()
        lengths = generate_lengths(self._model, args, kwargs, output) if output is not None else None
        if lengths is not None:
            prompt, completion, padded_prompt, padded_completion = lengths
            meter.add_generation(
                prompt, completion, padded_prompt=padded_prompt, padded_completion=padded_completion
            )


def _call_as_batch(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The batch a forward call was given: its keywords, with positional arguments named by the
    forward's signature (``model(input_ids, attention_mask=mask)``); a lone positional batch as is."""
    if not args:
        return kwargs
    if not kwargs:
        return args[0] if len(args) == 1 else args
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return kwargs
    batch: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            batch.update(value)
        else:
            batch[name] = value
    return batch
