"""Decoder-only language models: the engine against torch's FlopCounterMode, step by step.

Each architecture is built tiny from its config, left at its default attention implementation
(sdpa) for the engine, and switched to eager attention for the truth. Every case is checked at
two sequence lengths with one engine, built from a batch of a third shape.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.flops.counting.tokens import TokenCounting
from mfu_callbacks.flops.features import HARDWARE, MODEL, Feature
from tests.conftest import (
    LENGTHS,
    VOCAB,
    assert_flops,
    check_engine,
    full_batch,
    make_eager,
    model_truth,
    one_per_family,
    packed_batch,
    padded_batch,
    step_truth,
)

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


def _trl_batches(length: int) -> tuple[dict, dict]:
    """TRL's padding-free rows of the same documents (the last a genuine one-token document, not a pad)
    without and with ``pad_to_multiple_of=8``."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ids = torch.randint(3, VOCAB, (length + 1,), generator=torch.Generator().manual_seed(length)).tolist()
    examples = [
        {"input_ids": ids[: length - 4]},
        {"input_ids": ids[length - 4 : length]},
        {"input_ids": ids[-1:]},
    ]
    collate = {
        multiple: DataCollatorForLanguageModeling(
            pad_token_id=0, padding_free=True, pad_to_multiple_of=multiple
        )
        for multiple in (None, 8)
    }
    return collate[None](examples), collate[8](examples)


def _model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in ("input_ids", "position_ids", "labels")}


@pytest.mark.parametrize("length", LENGTHS)
def test_trl_padding_free_pads_are_padding(length: int) -> None:
    """TRL's pad_to_multiple_of adds pad tokens that look like one-token documents: they are padding."""
    unpadded, padded = _trl_batches(length)
    pads = padded["input_ids"].shape[1] - (length + 1)
    assert pads > 0 and padded["cu_seq_lens_q"].numel() == 4 + pads  # each pad is a document to the kernels
    model = build("llama")
    engine = FlopEngine.from_model(model, _trl_batches(9)[1])
    step = engine.estimate(padded)
    assert (step.tokens, step.padded_tokens) == (length + 1, length + 1 + pads)
    assert step.padding_fraction == pytest.approx(pads / (length + 1 + pads))
    make_eager(model)
    assert_flops(step.model_flops, model_truth(model, _model_inputs(unpadded)), "model FLOPs")
    assert_flops(step.hardware_flops, step_truth(model, _model_inputs(padded)), "hardware FLOPs")


@pytest.mark.parametrize("per_document", [True, False])
@pytest.mark.parametrize("length", LENGTHS)
def test_trl_padding_free_features(length: int, per_document: bool) -> None:
    """The same documents' features, plus the pads in the hardware row only (squares of 1 each under a
    per-document kernel such as flash attention, the whole row's square otherwise)."""
    unpadded, padded = _trl_batches(length)
    width = padded["input_ids"].shape[1]
    pads = width - (length + 1)
    counting = TokenCounting(encoder_decoder=False, attention_per_document=per_document, pad_token_id=0)
    plain, counted = counting.count(unpadded), counting.count(padded)
    expected = plain.clone()
    expected[HARDWARE, Feature.TOKENS] += pads
    expected[HARDWARE, Feature.SQUARES] = (
        plain[HARDWARE, Feature.SQUARES] + pads if per_document else width**2
    )
    assert torch.equal(counted, expected)
    assert counted[MODEL, Feature.SQUARES] == (length - 4) ** 2 + 4**2 + 1  # the one-token document is real
