"""Activation checkpointing with a frozen base: model FLOPs stay those of the run without it.

Switching checkpointing on also installs ``enable_input_require_grads`` (transformers does it for
every model fed ``input_ids``, PEFT when it wraps a checkpointed model): the input embeddings'
output then requires a gradient, and every first-layer input gradient runs although no trainable
parameter lies upstream. Those products and the recompute are hardware FLOPs; the model FLOPs are
the truth of the model with neither checkpointing nor the hook. Every case is checked at two
sequence lengths on padded batches, against torch's FlopCounterMode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from peft import LoraConfig, get_peft_model
from torch import nn

from mfu_callbacks.flops import FlopEngine
from tests.conftest import (
    LENGTHS,
    assert_flops,
    checkpointing_off,
    input_gradients_unforced,
    make_eager,
    model_truth,
    padded_batch,
    step_truth,
)
from tests.flops.test_adapters import Linear4bit, quantized
from tests.flops.test_decoders import build as build_decoder


def lora() -> nn.Module:
    return get_peft_model(
        build_decoder("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )


def qlora() -> nn.Module:
    """Quantized base linears (counted from their shapes by the engine) under LoRA."""
    model = quantized(build_decoder("llama"), Linear4bit)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def frozen_bottom() -> nn.Module:
    """Full fine-tuning above a frozen bottom (embeddings and the first layer): what the hook forces is
    the whole first layer's input gradients (a trainable first norm would need them anyway)."""
    model = build_decoder("llama")
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[0].requires_grad_(False)
    return model


MODELS = {
    "lora": pytest.param(lora, id="lora"),
    "qlora_stand_in": pytest.param(qlora, id="qlora_stand_in", marks=pytest.mark.slow),
    "frozen_bottom": pytest.param(frozen_bottom, id="frozen_bottom", marks=pytest.mark.slow),
}


def test_the_hook_runs_input_gradients_the_model_does_not_need() -> None:
    """What the engine must keep out of model FLOPs is real: checkpointing installs the hook, and the
    hook alone (checkpointing off) makes the step cost more."""
    model = lora()
    model.gradient_checkpointing_enable()
    batch = padded_batch([LENGTHS[0]])
    with checkpointing_off(model):
        forced = step_truth(model, batch)
        with input_gradients_unforced(model):
            assert forced > step_truth(model, batch)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("build", MODELS.values())
def test_checkpointing_leaves_model_flops_alone(build: Callable[[], nn.Module], reentrant: bool) -> None:
    model = build()
    template = padded_batch([9, 4])
    without = FlopEngine.from_model(model, template)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = FlopEngine.from_model(model, template)
    make_eager(model)
    for length in LENGTHS:
        batch = padded_batch([length, length - 3])
        step = checkpointed.estimate(batch)
        assert step.model_flops == without.estimate(batch).model_flops
        assert_flops(step.model_flops, model_truth(model, batch), f"model FLOPs at length {length}")
        assert_flops(step.hardware_flops, step_truth(model, batch), f"hardware FLOPs at length {length}")
