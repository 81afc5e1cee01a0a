"""Mixture-of-experts language models: routed experts counted per token and top-k, shared experts, routers.

The user's model keeps transformers' default experts kernel (grouped mm, which FlopCounterMode
does not see) and sdpa; the truth switches both to eager. Padding tokens are routed too, so they
cost hardware FLOPs only.
"""

from __future__ import annotations

import pytest
import transformers
from peft import LoraConfig, get_peft_model

from tests.conftest import (
    LENGTHS,
    SMALL_DECODER,
    check_engine,
    full_batch,
    one_per_family,
    packed_batch,
    padded_batch,
)

_BASE = {**SMALL_DECODER, "num_experts_per_tok": 2}

# name: (config class, model class, config arguments)
ARCHITECTURES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_BASE, "num_local_experts": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**_BASE, "num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 48},
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_BASE, "num_experts": 4}),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **_BASE,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 2,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "num_key_value_heads": 4,
        },
    ),
}


def build(name: str):
    config_class, model_class, arguments = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**arguments)
    return getattr(transformers, model_class)(config).train()


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "mixtral"))
def test_full_fine_tuning(name: str) -> None:
    check_engine(build(name), full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "mixtral"))
def test_lora(name: str) -> None:
    model = get_peft_model(build(name), LoraConfig(r=4, target_modules="all-linear"))
    check_engine(model, full_batch(2, 9), [full_batch(3, length) for length in LENGTHS])


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "mixtral"))
def test_gradient_checkpointing(name: str, reentrant: bool) -> None:
    model = build(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    check_engine(model, full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])


@pytest.mark.slow  # the MoE counting of padded rows is the dense one's; mixtral's LoRA test stays in the unit tier
@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "mixtral"))
def test_padded_batch(name: str) -> None:
    batches = [padded_batch([length, length - 3, 2]) for length in LENGTHS]
    check_engine(build(name), padded_batch([9, 4]), batches)


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "mixtral"))
def test_packed_rows(name: str) -> None:
    batches = [packed_batch([length - 4, 4]) for length in LENGTHS]
    check_engine(build(name), packed_batch([5, 4]), batches)


@pytest.mark.slow
def test_first_dense_layers_of_deepseek_are_counted_dense() -> None:
    """first_k_dense_replace=2: two dense MLP layers, then MoE layers; each kind traced as itself."""
    config_class, model_class, arguments = ARCHITECTURES["deepseek_v3"]
    config = getattr(transformers, config_class)(
        **{**arguments, "first_k_dense_replace": 2, "num_hidden_layers": 5}
    )
    model = getattr(transformers, model_class)(config).train()
    check_engine(model, full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])
