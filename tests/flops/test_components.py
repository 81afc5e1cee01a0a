"""The per-component breakdown: each matmul named by what it computes, on the paths real models and
their wrappers (PEFT LoRA, TRL value heads) give, and in the engine against FlopCounterMode per module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.flops.components import classify, component_of_parameter
from mfu_callbacks.testing import make_eager
from tests.conftest import LENGTHS, assert_flops, full_batch, step_truth
from tests.flops.test_decoders import build as build_decoder
from tests.flops.test_moe import ARCHITECTURES

PEFT = ["PeftModelForCausalLM", "LoraModel"]
LAYER = "base_model.model.model.layers.1"

# (path, classes on the module stack, component): paths as named_modules() gives them under
# LoraConfig(target_modules=["gate"]) (Mixtral, OLMoE, DeepSeek-V3: PEFT wraps the router's weight in a
# ParamWrapper) and, for Qwen2-MoE, target_parameters=["mlp.gate.weight"], target_modules=["shared_expert_gate"].
LORA_ROUTERS = [
    (f"{LAYER}.mlp.gate", [*PEFT, "MixtralSparseMoeBlock", "ParamWrapper"], "router"),
    (f"{LAYER}.mlp.gate.base_layer", [*PEFT, "ParamWrapper", "MixtralTopKRouter"], "router"),
    (f"{LAYER}.mlp.gate.lora_A.default", [*PEFT, "ParamWrapper", "Linear"], "adapters"),
    (f"{LAYER}.mlp.gate.lora_B.default", [*PEFT, "ParamWrapper", "Linear"], "adapters"),
    (f"{LAYER}.mlp.gate.base_layer", [*PEFT, "ParamWrapper", "OlmoeTopKRouter"], "router"),
    (f"{LAYER}.mlp.gate.base_layer", [*PEFT, "ParamWrapper", "DeepseekV3TopkRouter"], "router"),
    (f"{LAYER}.mlp.shared_experts.gate_proj.base_layer", [*PEFT, "Linear"], "shared_experts"),
    (f"{LAYER}.mlp.gate.base_layer", [*PEFT, "ParamWrapper", "Qwen2MoeTopKRouter"], "router"),
    (f"{LAYER}.mlp.shared_expert_gate.base_layer", [*PEFT, "Linear", "Linear"], "router"),
    (f"{LAYER}.mlp.shared_expert.gate_proj.base_layer", [*PEFT, "Linear", "Linear"], "shared_experts"),
    (f"{LAYER}.mlp.experts.base_layer", [*PEFT, "ParamWrapper", "MixtralExperts"], "experts"),
    (f"{LAYER}.mlp.gate.modules_to_save.default", [*PEFT, "ModulesToSaveWrapper", "Linear"], "router"),
    (f"{LAYER}.mlp.ffn.switch", ["Model", "MoEGate"], "router"),
    ("model.layers.0.block_sparse_moe.selector", ["Model", "MoEGate"], "router"),
]

HEADS = [  # TRL's value head (AutoModelForCausalLMWithValueHead), value / reward heads, a reward model's score
    ("v_head.summary", ["AutoModelForCausalLMWithValueHead", "ValueHead", "Linear"]),
    ("value_head", ["CriticModel", "Linear"]),
    ("reward_head", ["RewardModel", "Linear"]),
    ("score", ["LlamaForSequenceClassification", "Linear"]),
    ("base_model.model.score.modules_to_save.default", [*PEFT, "ModulesToSaveWrapper", "Linear"]),
    ("base_model.model.lm_head.base_layer", [*PEFT, "Linear", "Linear"]),
    ("pre_classifier", ["DistilBertForSequenceClassification", "Linear"]),
]


@pytest.mark.parametrize(("path", "classes", "component"), LORA_ROUTERS)
def test_routers_and_their_adapters_under_lora(path: str, classes: list[str], component: str) -> None:
    assert classify(path, classes, activation_matmul=False) == component


@pytest.mark.parametrize(("path", "classes"), HEADS)
def test_custom_heads(path: str, classes: list[str]) -> None:
    assert classify(path, classes, activation_matmul=False) == "head"


def test_custom_attention_is_named_by_its_class() -> None:
    """A mixer whose path says nothing of attention: its class does; a mixer that is no attention is not."""
    stack = ["HybridModel", "Block", "CausalSelfAttention"]
    assert classify("blocks.0.mixer", stack, activation_matmul=True) == "attention_scores"
    assert (
        classify("blocks.0.mixer.qkv", [*stack, "Linear"], activation_matmul=False) == "attention_projections"
    )
    assert (
        classify(
            "blocks.0.mixer.qkv", ["HybridModel", "Block", "MambaMixer", "Linear"], activation_matmul=False
        )
        == "other"
    )


@pytest.mark.parametrize(
    ("owner", "component"),
    [
        ("lm_head", "head"),
        ("base_model.model.lm_head.base_layer", "head"),
        (
            "model.embed_tokens",
            "head",
        ),  # tied embeddings: a matmul with the embedding is the output projection
        ("transformer.wte", "head"),
        ("model.layers.0.mlp.gate.lora_A.default", "adapters"),
        ("model.layers.0.self_attn.q_proj", "attention_projections"),
    ],
)
def test_component_of_a_parameter_used_outside_its_module(owner: str, component: str) -> None:
    assert component_of_parameter(owner) == component


def per_module_truth(model: nn.Module, batch: dict[str, torch.Tensor], suffix: str) -> int:
    """Forward + backward FLOPs FlopCounterMode attributes to the modules whose names end with ``suffix``
    (eager attention and experts, on a copy)."""
    reference = make_eager(copy.deepcopy(model))
    with FlopCounterMode(display=False) as counter:
        reference(**batch).loss.backward()
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(suffix))


def two_layer_mixtral() -> nn.Module:
    """Layer 0's router needs no input gradient (nothing below it trains), layer 1's does."""
    _, _, arguments = ARCHITECTURES["mixtral"]
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**{**arguments, "num_hidden_layers": 2})
    ).train()


def trainable_routers(model: nn.Module) -> nn.Module:
    """The model with only its routers' weights trained: their matmuls need what LoRA on them needs."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.weight.requires_grad_(True)
    return model


def test_a_lora_wrapped_router_is_the_router() -> None:
    """Mixtral with LoRA on its routers only: the router's own product (in the wrapped base layer) is
    ``router``, as costly as the product of a trainable router without LoRA; the adapters' B @ A (in
    PEFT's wrapper, outside lora_A's and lora_B's forward) is ``adapters``, the rest of the wrapper."""
    model = get_peft_model(two_layer_mixtral(), LoraConfig(r=4, target_modules=["gate"]))
    twin = trainable_routers(two_layer_mixtral())
    engine = FlopEngine.from_model(model, full_batch(2, 9))
    for length in LENGTHS:
        batch = full_batch(3, length)
        step = engine.estimate(batch)
        routers = per_module_truth(twin, batch, "mlp.gate")
        wrappers = per_module_truth(model, batch, "mlp.gate")
        assert_flops(step.breakdown["router"], routers, f"router at length {length}")
        assert_flops(step.breakdown["adapters"], wrappers - routers, f"adapters at length {length}")
        assert "mlp" not in step.breakdown and "other" not in step.breakdown


def fused_loss_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A fused cross-entropy head: the model's body, then logits from ``lm_head.weight`` outside lm_head."""
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
    logits = hidden @ model.lm_head.weight.t()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def test_a_fused_loss_head_is_the_head() -> None:
    model = build_decoder("llama")
    engine = FlopEngine.from_model(model, full_batch(2, 9), forward=fused_loss_forward)
    for length in LENGTHS:
        batch = full_batch(3, length)
        step = engine.estimate(batch)
        assert_flops(step.breakdown["head"], per_module_truth(model, batch, "lm_head"), f"head at {length}")
        truth = step_truth(make_eager(copy.deepcopy(model)), batch, fused_loss_forward)
        assert_flops(step.model_flops, truth, f"model FLOPs at {length}")
        assert "other" not in step.breakdown
