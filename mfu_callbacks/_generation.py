"""Generation inside the optimizer step (GRPO, RLOO, online DPO), timed and counted as a phase of its own.

The step's time stays the wall clock: generation is inside it. What this adds is the split: how much
of each step went into generating (two CUDA events around each generation, resolved at the read, as
the step timer does; the host clock without CUDA), the generation's model FLOPs (counted from the
prompt and completion lengths by the engine's forward formula, ``flops/generation.py``) and the bytes
it read. A generation outside any step (an evaluation's) is left out, and so is one in a step that is
not measured (warm-up, the step that built the FLOP engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .flops import FlopEngine
from .flops.counting.attention_windows import AttentionWindow
from .flops.features import HARDWARE, MODEL
from .flops.generation import (
    NUM_GENERATION_FEATURES,
    GenerationFeature,
    count_generation,
    generation_bytes,
    generation_flops,
    weight_bytes_per_forward,
)
from .flops.unwrap import unwrap_model

_KEEP_STEPS = 256  # steps kept apart before the oldest are folded together (as the step timer does)
_Pair = tuple[torch.cuda.Event, torch.cuda.Event]
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp8": 1}


@dataclass
class _Step:
    """The generations of one measured step (or of several older steps folded together)."""

    steps: int = 1
    seconds: float = 0.0  # resolved time
    pairs: tuple[_Pair, ...] = ()  # CUDA events not yet resolved
    features: torch.Tensor | None = None  # (2, NUM_GENERATION_FEATURES) on the device


_NONE = _Step()  # a measured step without generations (shared: entries of the ended steps are never changed)


@dataclass(frozen=True)
class GenerationWindow:
    """The generations of the steps a read takes: time, features (host lists) and those of the last step."""

    seconds: float = 0.0
    features: list[list[int]] | None = None
    last: list[list[int]] | None = None


@dataclass(frozen=True)
class GenerationCost:
    """What a window's generations cost: model and hardware FLOPs, new tokens and bytes read."""

    model_flops: float = 0.0
    hardware_flops: float = 0.0
    tokens: float = 0.0
    bytes_read: float = 0.0


class GenerationPhase:
    """Times and counts the generations of each optimizer step; read with the steps they belong to."""

    def __init__(
        self,
        model: nn.Module,
        *,
        uses_cuda_events: bool,
        device: torch.device | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._uses_cuda_events = uses_cuda_events
        self._device = device
        self._clock = clock
        self._windows: tuple[AttentionWindow, ...] | None = None  # the model's attention windows, read once
        self._model = model
        self._step_open = False
        self._open: _Step | None = None  # made at the open step's first generation
        self._began: float | torch.cuda.Event | None = None
        self._ended: list[_Step] = []  # a step without generations is ``_NONE``

    @property
    def running(self) -> bool:
        """Whether a generation is running now (its forwards are not training forwards)."""
        return self._began is not None

    # -- per step ---------------------------------------------------------------------------------------
    def step_begins(self) -> None:
        self._step_open = True
        self._open = None

    def step_ends(self, measured: bool) -> None:
        """The step ends: its generations are kept if it is measured, else dropped."""
        self._step_open = False
        if measured:
            self._ended.append(self._open if self._open is not None else _NONE)
            if len(self._ended) > _KEEP_STEPS:
                self._fold()
        self._open = None

    @property
    def _open_step(self) -> _Step:
        if self._open is None:
            self._open = _Step()
        return self._open

    def begins(self) -> None:
        if self._began is not None:
            return
        self._began = self._record() if self._uses_cuda_events else self._clock()

    def ends(self) -> None:
        began, self._began = self._began, None
        if began is None or not self._step_open:
            return
        if isinstance(began, torch.cuda.Event):
            self._open_step.pairs += ((began, self._record()),)
        else:
            self._open_step.seconds += self._clock() - began

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Around a generation the package does not see as a ``generate`` call (vLLM colocated)."""
        self.begins()
        try:
            yield
        finally:
            self.ends()

    def add(
        self,
        prompt_lengths: torch.Tensor | Sequence[int],
        completion_lengths: torch.Tensor | Sequence[int],
        *,
        padded_prompt: int | None = None,
        padded_completion: int | None = None,
    ) -> None:
        """Count a generation of the open step from its lengths (tensors stay on their device)."""
        if not self._step_open:
            return
        prompt = torch.as_tensor(prompt_lengths)
        completion = torch.as_tensor(completion_lengths, device=prompt.device)
        counts = count_generation(
            prompt,
            completion,
            padded_prompt=padded_prompt,
            padded_completion=padded_completion,
            windows=self.windows,
        )
        step = self._open_step
        step.features = counts if step.features is None else step.features + counts.to(step.features.device)

    @property
    def windows(self) -> tuple[AttentionWindow, ...]:
        if self._windows is None:
            from .flops import token_counting

            self._windows = token_counting(self._model).windows
        return self._windows

    # -- at the read ------------------------------------------------------------------------------------
    def drain(self, steps: int) -> GenerationWindow:
        """The oldest ``steps`` measured steps' generations (the steps the timer read: finished on the device)."""
        entries, covered = 0, 0
        while entries < len(self._ended) and covered < steps:
            covered += self._ended[entries].steps
            entries += 1
        taken, self._ended = self._ended[:entries], self._ended[entries:]
        generated = [step for step in taken if step is not _NONE]
        if not generated:
            return GenerationWindow()
        seconds = sum(step.seconds + _elapsed(step.pairs) for step in generated)
        counted = [step.features for step in generated if step.features is not None]
        if not counted:
            return GenerationWindow(seconds=seconds)
        total = torch.stack([features.to(counted[0].device) for features in counted]).sum(0).tolist()
        last = taken[-1].features if taken[-1].steps == 1 else None
        return GenerationWindow(seconds, total, last.tolist() if last is not None else None)

    def _fold(self) -> None:
        """Fold the oldest half into one entry (their events resolved where the device passed them)."""
        cut = len(self._ended) - _KEEP_STEPS // 2
        old = self._ended[:cut]
        folded = _Step(steps=sum(step.steps for step in old))
        for step in old:
            folded.seconds += step.seconds
            for pair in step.pairs:
                if pair[1].query():
                    folded.seconds += pair[0].elapsed_time(pair[1]) / 1000.0
                else:
                    folded.pairs += (pair,)
            if step.features is not None:
                folded.features = (
                    step.features if folded.features is None else folded.features + step.features
                )
        self._ended[:cut] = [folded]

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event


def _elapsed(pairs: Sequence[_Pair]) -> float:
    return sum(begin.elapsed_time(end) for begin, end in pairs) / 1000.0


def generation_cost(
    engine: FlopEngine, model: nn.Module, features: list[list[int]], compute_dtype: str | None
) -> GenerationCost:
    """FLOPs and bytes of generations with these features, by the engine's forward coefficients."""
    head = head_flops_per_token(model)
    forward = engine.forward_coefficients
    weight_bytes = weight_bytes_per_forward(forward, _weight_bytes(model), head_per_token=head)
    kv_bytes = kv_cache_bytes_per_token(model, _BYTES.get(compute_dtype or "", _weight_bytes(model)))
    return GenerationCost(
        model_flops=generation_flops(forward, features[MODEL], head_per_token=head),
        hardware_flops=generation_flops(forward, features[HARDWARE], head_per_token=head),
        tokens=float(features[MODEL][GenerationFeature.GENERATED]),
        bytes_read=generation_bytes(
            features[HARDWARE], weight_bytes_per_forward=weight_bytes, kv_bytes_per_token=kv_bytes
        ),
    )


def head_flops_per_token(model: nn.Module) -> float | None:
    """Forward FLOPs of the output head per scored position, 2 x its weight (a training step counted
    on the real step may have scored only some positions: its per-token head coefficient is then not this)."""
    getter = getattr(unwrap_model(model), "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None
    weight = getattr(head, "weight", None)
    # A sharded weight (a DTensor, a flat parameter's view) is left to the engine's count.
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    return 2.0 * weight.numel() if weight.dim() == 2 else None


def kv_cache_bytes_per_token(model: nn.Module, element_bytes: float) -> float:
    """Bytes of keys and values one token holds in the cache: 2 x layers x key/value heads x head size."""
    for module in unwrap_model(model).modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        heads = getattr(text, "num_attention_heads", None)
        if not layers or not heads:
            continue
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return 2.0 * layers * kv_heads * head_dim * element_bytes
    return 0.0


def _weight_bytes(model: nn.Module) -> int:
    """Bytes per element of the model's weights (the storage dtype most of its parameters have)."""
    sizes: dict[int, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point():
            sizes[parameter.element_size()] = sizes.get(parameter.element_size(), 0) + parameter.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else 4


__all__ = [
    "NUM_GENERATION_FEATURES",
    "GenerationCost",
    "GenerationPhase",
    "GenerationWindow",
    "generation_cost",
]
