"""Micro-batches seen by a forward pre-hook, for frameworks that hand callbacks no batch (HF Trainer,
Accelerate), and the generations of the model's ``generate`` inside a step (``_generation.py``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._generate_watch import GenerateWatch, generate_lengths
from ._guard import entry_point
from ._torch_internals import call_keywords

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
        self._other_models: torch.utils.hooks.RemovableHandle | None = None  # see ``watch_other_models``
        self._own_modules: set[int] = set()  # ids of the watched model's modules, while that hook is in

    def remove(self) -> None:
        """Take the hooks off the model (and off every module)."""
        self.stop_watching_other_models()
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
                self.stop_watching_other_models()
                session.guard.run(session.meter.add_forward, _call_as_batch(module, args, kwargs))
            return
        if not session.step_open:
            session.begin_step()
        self.stop_watching_other_models()
        session.add_batch(_call_as_batch(module, args, kwargs))

    # -- another model's pass before the watched model's first (GRPO's reference) ------------------------
    def watch_other_models(self) -> None:
        """From the start of a step whose real step is to be observed until its first forward of the
        watched model, a hook on every module looks for a pass without grad of another model (GRPO's
        reference model, which TRL builds itself, scores the completions before the policy's training
        forward): the observation opens there, so that this pass is counted too."""
        meter = self.session.meter
        if self._other_models is not None or meter is None or self.session.guard.failed:
            return
        if meter.awaits_first_pass:
            self._own_modules = {id(module) for module in self._model.modules()}
            hook = torch.compiler.disable(self._before_other_forward)
            self._other_models = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def stop_watching_other_models(self) -> None:
        """Take the hook on every module off (the watched model's first pass came, or the step ended)."""
        handle, self._other_models = self._other_models, None
        if handle is not None:
            handle.remove()
            self._own_modules = set()

    @entry_point()
    def _before_other_forward(self, module: nn.Module, args: tuple) -> None:
        """The hook on every module (returns None): the first call without grad outside ``generate``
        of a module not in the watched model is the outermost of another model's pass."""
        if id(module) in self._own_modules or torch.is_grad_enabled() or self.generating:
            return
        self.stop_watching_other_models()
        session = self.session
        kwargs = call_keywords(module)
        if session.meter is not None and session.step_open and (args or kwargs):
            session.meter.add_forward(_call_as_batch(module, args, kwargs or {}), other_model=True)

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
