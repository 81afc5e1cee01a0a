"""Decoder-only language models: the engine against torch's FlopCounterMode, step by step.

Each architecture is built tiny from its config, left at its default attention implementation
(sdpa) for the engine, and switched to eager attention for the truth. Every case is checked at
two sequence lengths with one engine, built from a batch of a third shape.
"""

from __future__ import annotations

import pytest
import transformers
from conftest import (
    LENGTHS,
    VOCAB,
    check_engine,
    full_batch,
    make_eager,
    one_per_family,
    packed_batch,
    padded_batch,
)
from peft import LoraConfig, get_peft_model

from mfu_callbacks.flops import FlopEngine

_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_SMALL = {
    **_IDS,
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
_LLAMA_LIKE = {**_SMALL, "intermediate_size": 64, "num_key_value_heads": 2}
# Sliding windows longer than every sequence here: FlopCounterMode counts a window's layers as full
# attention, so windows that bite are checked against a window-only twin in test_flops_windows.py.
_WIDE_WINDOW = {"head_dim": 8, "sliding_window": 32}

# name: (config class, model class, config arguments, accepts position_ids)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE, True),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE, True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}, True),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_LLAMA_LIKE, **_WIDE_WINDOW},
        True,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_LLAMA_LIKE, **_WIDE_WINDOW},
        True,
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_LIKE, True),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {**_IDS, "vocab_size": VOCAB, "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64},
        True,
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_SMALL, "intermediate_size": 64}, True),
    "opt": ("OPTConfig", "OPTForCausalLM", {**_SMALL, "ffn_dim": 64, "word_embed_proj_dim": 32}, True),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {**_IDS, "vocab_size": VOCAB, "hidden_size": 32, "n_layer": 3, "n_head": 4},
        False,
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {**_SMALL, "new_decoder_architecture": True, "num_kv_heads": 2},
        True,
    ),
}


def build(name: str):
    config_class, model_class, arguments, _ = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**arguments)
    model = getattr(transformers, model_class)(config)
    return model.train()


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llama"))
def test_full_fine_tuning(name: str) -> None:
    check_engine(build(name), full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llama"))
def test_lora(name: str) -> None:
    check_engine(lora(build(name)), full_batch(2, 9), [full_batch(3, length) for length in LENGTHS])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llama"))
def test_gradient_checkpointing(name: str, reentrant: bool) -> None:
    """Hardware FLOPs include the recompute that torch's checkpoint really runs; model FLOPs do not."""
    model = build(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    check_engine(model, full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llama"))
def test_lora_with_gradient_checkpointing(name: str) -> None:
    model = build(name)
    model.gradient_checkpointing_enable()
    check_engine(lora(model), full_batch(2, 9), [full_batch(2, length) for length in LENGTHS])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llama"))
def test_padded_batch(name: str, side: str) -> None:
    """Model FLOPs count each row's real tokens; hardware FLOPs the padded rectangle."""
    batches = [padded_batch([length, length - 3, 2], side=side) for length in LENGTHS]
    check_engine(build(name), padded_batch([9, 4], side=side), batches)


@pytest.mark.parametrize(
    "name", one_per_family([name for name, spec in ARCHITECTURES.items() if spec[3]], "llama")
)
def test_packed_rows(name: str) -> None:
    """Attention per document for model FLOPs; eager attention computes the whole row's square."""
    batches = [packed_batch([length - 4, 4]) for length in LENGTHS] + [packed_batch([2, 3, LENGTHS[1]])]
    check_engine(build(name), packed_batch([5, 4]), batches)


@pytest.mark.parametrize("name", one_per_family(ARCHITECTURES, "llama"))
def test_sdpa_and_eager_models_give_the_same_engine(name: str) -> None:
    batch = padded_batch([LENGTHS[1], 4])
    model = build(name)
    from_sdpa = FlopEngine.from_model(model, batch).estimate(batch)
    from_eager = FlopEngine.from_model(make_eager(model), batch).estimate(batch)
    assert model.config._attn_implementation == "eager"
    assert from_sdpa == from_eager
