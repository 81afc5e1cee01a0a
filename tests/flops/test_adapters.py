"""PEFT adapters and partly frozen models: only the backward products autograd really runs are counted.

Every case runs a padded batch of mixed lengths at both sequence lengths (model FLOPs per real
row, hardware FLOPs on the padded rectangle) against torch's FlopCounterMode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.conftest import LENGTHS, check_engine, full_batch, padded_batch
from tests.flops.test_decoders import build as build_decoder
from tests.flops.test_moe import build as build_moe
from tests.flops.test_plain import TinyCNN, cnn_forward, image_batch


def padded_batches() -> list[dict[str, torch.Tensor]]:
    return [padded_batch([length, length - 3, 2]) for length in LENGTHS]


def check_lora(model: nn.Module, **lora_options) -> None:
    check_engine(
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora_options)),
        padded_batch([9, 4]),
        padded_batches(),
    )


# name: LoraConfig arguments on a tiny Llama
LLAMA_CASES = {
    "attention_only": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "all_linear": {"target_modules": "all-linear"},
    "lm_head": {"target_modules": ["q_proj", "lm_head"]},
    "embedding": {"target_modules": ["embed_tokens", "v_proj"]},
    "rslora": {"target_modules": "all-linear", "use_rslora": True},
    "modules_to_save": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("case", LLAMA_CASES)
def test_lora_target_sets(case: str) -> None:
    check_lora(build_decoder("llama"), **LLAMA_CASES[case])


def test_dora() -> None:
    """DoRA's weight norm needs lora_B @ lora_A (and its backward) once per forward call, whatever the
    tokens. Full rows: the truth of a padded batch runs each row as its own call, which would repeat it."""
    model = get_peft_model(
        build_decoder("llama"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    )
    check_engine(model, full_batch(2, 9), [full_batch(3, length) for length in LENGTHS])


def test_several_adapters_one_active() -> None:
    model = get_peft_model(build_decoder("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("wide", LoraConfig(r=8, target_modules="all-linear"))
    model.set_adapter("default")
    check_engine(model, padded_batch([9, 4]), padded_batches())


def test_merged_adapter_runs_no_adapter() -> None:
    """After ``merge_adapter()`` the adapters' weights stay trainable but no adapter matmul runs (the
    head, saved as trainable, keeps a backward to count)."""
    model = get_peft_model(
        build_decoder("llama"), LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"])
    )
    model.merge_adapter()
    check_engine(model, padded_batch([9, 4]), padded_batches())


def test_lora_on_conv() -> None:
    model = get_peft_model(
        TinyCNN().train(), LoraConfig(r=2, target_modules=["features.0", "features.2", "head"])
    )
    check_engine(model, image_batch(2), [image_batch(1), image_batch(3)], forward=cnn_forward)


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("name", ["olmoe", "mixtral"])
def test_lora_on_expert_parameters(name: str) -> None:
    """``target_parameters``: the experts' 3-D weights get a LoRA delta (parametrization) per call."""
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(
        build_moe(name), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets)
    )
    check_engine(model, full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])


class Linear4bit(nn.Linear):
    """A stand-in for ``bitsandbytes.nn.Linear4bit`` (bitsandbytes does not run on this CPU): same class
    name and attributes (``in_features``, ``out_features``, ``weight``, ``bias``), frozen, and the same
    matmul as the real layer's dequantize-then-multiply. The engine recognises it by name and counts it
    from its shape, as it must for the real one, whose kernels have no meta-device implementation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class Linear8bitLt(Linear4bit):
    """A stand-in for ``bitsandbytes.nn.Linear8bitLt``, as above."""


def quantized(model: nn.Module, kind: type[nn.Linear]) -> nn.Module:
    """Replace the decoder layers' linears by frozen stand-ins of a quantized class, as QLoRA loading does."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    replacement = kind(child.in_features, child.out_features, bias=child.bias is not None)
                    replacement.load_state_dict(child.state_dict())
                    setattr(parent, child_name, replacement.requires_grad_(False))
    return model


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize(
    "kind", [Linear4bit, pytest.param(Linear8bitLt, marks=pytest.mark.slow)], ids=["4bit", "8bit"]
)
def test_qlora_stand_in(kind: type[nn.Linear]) -> None:
    check_lora(quantized(build_decoder("llama"), kind), target_modules="all-linear")


def test_partly_frozen_model() -> None:
    """Embeddings and the first two of four layers frozen: no backward at all below layer 2."""
    model = build_decoder("llama")
    model.model.layers.append(type(model.model.layers[0])(model.config, 3))
    model.model.embed_tokens.requires_grad_(False)
    for layer in model.model.layers[:2]:
        layer.requires_grad_(False)
    check_engine(model, padded_batch([9, 4]), padded_batches())
