"""A truth for post-training steps (TRL's trainers), shared by the tests that check them.

Every forward that the trainer's models run inside an optimizer step (between the Trainer's
``on_step_begin`` and ``on_step_end``) is recorded with its inputs, whether grad was on, and whether
PEFT adapters were disabled. After training, each is replayed under torch's ``FlopCounterMode``, one
call at a time, with the model's plain modules: the backbone on every token, the LM head on the
positions TRL's fused head scores (every position but the last of a row; on CUDA, where its Triton
kernel runs, those whose next-token label is not -100; every position when the call has no labels). A call made with grad counts its forward and the backward autograd runs
for the trainable parameters (``torch.autograd.grad``: what training needs, nothing forced); one made
without grad counts its forward once. The sum per step is that step's model FLOPs (no padding when
every sequence has the same length, no checkpoint recompute: gradient checkpointing is off).

Nothing here reads mfu_callbacks: the numbers come from torch's own counter.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from mfu_callbacks.testing import causal_lm, word_tokenizer

VOCAB = 64
IGNORED = -100


@dataclass
class Call:
    model: nn.Module
    kwargs: dict[str, Any]
    grad: bool
    adapters_disabled: bool


class StepTruth(TrainerCallback):
    """Records every forward of ``models`` inside each optimizer step; ``step_flops()`` replays them."""

    def __init__(self, *models: nn.Module | None) -> None:
        self.steps: list[list[Call]] = []
        self._calls: list[Call] | None = None
        self._handles = [
            model.register_forward_pre_hook(self._record, with_kwargs=True)
            for model in models
            if model is not None
        ]

    def on_step_begin(self, args, state, control, **kwargs):
        self._calls = []

    def on_step_end(self, args, state, control, **kwargs):
        if self._calls is not None:
            self.steps.append(self._calls)
        self._calls = None

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._calls is None:  # outside the optimizer step (evaluation, precomputing)
            return
        named = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        named = {**named.pop("kwargs", {}), **named}
        kept = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in named.items()}
        self._calls.append(Call(module, kept, torch.is_grad_enabled(), _adapters_disabled(module)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def step_flops(self) -> list[float]:
        """Model FLOPs of each recorded optimizer step."""
        return [sum(replay(call) for call in calls) for calls in self.steps]


def _adapters_disabled(model: nn.Module) -> bool:
    return any(getattr(module, "disable_adapters", False) is True for module in model.modules())


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The PEFT wrapper (or the model), the backbone and the head (a causal LM's, or a sequence
    classifier's ``score``, which transformers applies at every position before picking the last)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model, inner.model, inner.lm_head if hasattr(inner, "lm_head") else inner.score


def replay(call: Call) -> float:
    """Model FLOPs of one recorded forward (and its backward, if it ran with grad)."""
    wrapper, backbone, head = _parts(call.model)
    kwargs = {k: v for k, v in call.kwargs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    labels = call.kwargs.get("labels")
    trainable = [p for p in call.model.parameters() if p.requires_grad]
    disabled = wrapper.disable_adapter() if call.adapters_disabled else nullcontext()
    with FlopCounterMode(display=False) as counter, disabled, torch.set_grad_enabled(call.grad):
        hidden = backbone(**kwargs, use_cache=False).last_hidden_state
        if labels is not None:  # TRL's fused head: every position but the last, or (Triton) the labelled ones
            hidden = hidden[:, :-1]
            if _scores_labelled_only(hidden.device):
                hidden = hidden[labels[:, 1:] != IGNORED]
        logits = head(hidden)
        if call.grad and trainable:
            torch.autograd.grad(logits.float().sum(), trainable, allow_unused=True)
    return float(counter.get_total_flops())


def _scores_labelled_only(device: torch.device) -> bool:
    """Whether TRL's fused head scores only the labelled positions on ``device`` (where Triton runs)."""
    try:
        from trl.trainer.utils import _use_triton
    except ImportError:
        return device.type == "cuda"
    return bool(_use_triton(device))


# -- tiny models and data ------------------------------------------------------------------------------
def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama with eager attention (FlopCounterMode counts its attention as it runs)."""
    return causal_lm(
        hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=VOCAB, attention="eager", seed=seed
    )


def tokenizer() -> Any:
    return word_tokenizer(VOCAB)


def _words(generator: torch.Generator, count: int) -> str:
    return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (count,), generator=generator).tolist())


def preference_rows(rows: int, prompt: int, completion: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt, chosen and rejected texts of fixed word counts (every sequence the same length: no padding)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": _words(generator, prompt),
            "chosen": _words(generator, completion),
            "rejected": _words(generator, completion),
        }
        for _ in range(rows)
    ]


def unpaired_rows(rows: int, prompt: int, completion: int, seed: int = 0) -> list[dict[str, Any]]:
    """KTO's rows: a prompt, one completion, and whether it is desirable (half and half)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": _words(generator, prompt),
            "completion": _words(generator, completion),
            "label": i % 2 == 0,
        }
        for i in range(rows)
    ]


def logged_step_flops(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, model FLOPs per step) of each logged row that carries MFU."""
    return [
        (row["step"], row["tflops_per_gpu"] * row["step_time"] * 1e12)
        for row in log_history
        if "tflops_per_gpu" in row and "step_time" in row
    ]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
