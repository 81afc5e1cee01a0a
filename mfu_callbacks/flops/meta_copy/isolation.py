"""Keep the probe passes from touching the training run's state.

Building the engine runs the model's own Python code a few times on a meta-device copy. That code
may draw random numbers (dropout masks are free on meta, but stochastic depth, layerdrop and noise
drawn with ``torch.rand`` on the CPU generator or ``random.random()`` are not), so every global
generator is put back exactly as it was: torch's CPU generator, every initialised CUDA generator,
Python's ``random`` and NumPy's global generator. Batches reach the probes as meta tensors, nested
containers included, or as CPU copies (image grids), so no tensor of the run is ever read or
written by a probe.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Every global random generator leaves this block in the state it entered it."""
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        if numpy is not None and numpy_state is not None:
            numpy.random.set_state(numpy_state)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value``, through mappings, lists and tuples (a batch, an op's arguments,
    a model's output)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def map_tensors(
    value: Any, convert: Callable[[str | None, torch.Tensor], Any], key: str | None = None
) -> Any:
    """``value`` with every tensor inside (mappings, lists, tuples, named tuples, dataclasses) replaced
    by ``convert(key, tensor)``, where ``key`` is the nearest mapping key or field name above it."""
    if isinstance(value, torch.Tensor):
        return convert(key, value)
    if isinstance(value, Mapping):  # any mapping (BatchEncoding, ModelOutput) reaches the copy as a dict
        return {k: map_tensors(v, convert, k) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, convert, name) for name, v in zip(value._fields, value)))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, convert, key) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(
            value,
            **{f.name: map_tensors(getattr(value, f.name), convert, f.name) for f in fields(value) if f.init},
        )
    return value
