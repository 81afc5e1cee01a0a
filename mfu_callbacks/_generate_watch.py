"""Watch a model's ``generate`` (transformers' ``GenerationMixin`` convention) as a phase of the step.

The model's ``generate`` is replaced on the instance by a thin wrapper for the run (removed when the
run ends): it tells the session a generation begins and ends, and hands it the call's inputs and
output. The call itself runs untouched, outside the callbacks' guard: its results and errors are the
caller's. Lengths are read from the call without a host sync:

- prompts: ``input_ids`` (or the first positional argument) and, when given, ``attention_mask``:
  real prompt tokens per row (left padding is not counted);
- completions: the output's sequences after the prompt columns, up to and including the first
  end-of-sequence token (``generation_config.eos_token_id``, as passed or the model's); a row
  without one generated every column.

An encoder-decoder's output does not hold the prompt; its generation is timed but not counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Lengths = tuple[torch.Tensor, torch.Tensor, int, int]  # prompt, completion (per row), padded shape


class GenerateWatch:
    """Wraps ``model.generate`` so that ``begins()`` and ``ends(args, kwargs, output)`` bracket each call."""

    def __init__(
        self,
        model: nn.Module,
        begins: Callable[[], Any],
        ends: Callable[[tuple, dict, Any], Any],
    ) -> None:
        self._model = model
        self._replaced: Callable[..., Any] | None = None
        original = getattr(model, "generate", None)
        if not callable(original):
            return

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            begins()
            try:
                output = original(*args, **kwargs)
            except BaseException:
                ends(args, kwargs, None)
                raise
            ends(args, kwargs, output)
            return output

        self._had_own = "generate" in vars(model)
        self._own = vars(model).get("generate")
        setattr(model, "generate", generate)  # noqa: B010 - an instance attribute, removed at the end
        self._replaced = generate

    def remove(self) -> None:
        """Put the model's ``generate`` back as it was (if nothing replaced ours since)."""
        model, replaced, self._replaced = self._model, self._replaced, None
        if replaced is None or vars(model).get("generate") is not replaced:
            return
        if self._had_own:
            setattr(model, "generate", self._own)  # noqa: B010
        else:
            delattr(model, "generate")  # noqa: B043


def generate_lengths(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Lengths | None:
    """Real prompt and completion lengths per generated row, and the padded shape, from a ``generate``
    call (device tensors, nothing read back); None where the call is not a decoder's token generation."""
    prompt_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(prompt_ids, torch.Tensor) or not isinstance(sequences, torch.Tensor):
        return None
    if prompt_ids.dim() != 2 or sequences.dim() != 2 or _is_encoder_decoder(model):
        return None
    rows, padded_prompt = prompt_ids.shape
    if rows == 0 or sequences.shape[0] % rows or sequences.shape[1] < padded_prompt:
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == prompt_ids.shape:
        prompt = mask.to(torch.int64).sum(1)
    else:
        prompt = torch.full((rows,), padded_prompt, dtype=torch.int64, device=prompt_ids.device)
    prompt = prompt.repeat_interleave(sequences.shape[0] // rows)  # num_return_sequences
    completion = sequences[:, padded_prompt:]
    steps = completion.shape[1]
    finished = _is_end(completion, _eos_ids(model, kwargs))
    if finished is None:
        return prompt, torch.full_like(prompt, steps), padded_prompt, steps
    first = finished.to(torch.int64).argmax(1) + 1
    lengths = torch.where(finished.any(1), first, torch.full_like(first, steps))
    return prompt, lengths.to(prompt.device), padded_prompt, steps


def _is_end(completion: torch.Tensor, eos: Sequence[int]) -> torch.Tensor | None:
    """Where the completion holds an end-of-sequence token (comparisons with scalars: no transfer)."""
    found: torch.Tensor | None = None
    for token in eos:
        hit = completion == token
        found = hit if found is None else found | hit
    return found


def _eos_ids(model: nn.Module, kwargs: dict) -> list[int]:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    if isinstance(eos, torch.Tensor):
        return [int(value) for value in eos.reshape(-1).tolist()]
    if isinstance(eos, int):
        return [eos]
    return [int(value) for value in eos] if isinstance(eos, (list, tuple)) else []


def _is_encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))
