"""Encoders, encoder-decoders and a vision transformer: the engine against torch's FlopCounterMode.

BERT and RoBERTa read a padded batch by its attention mask; T5 and BART count their encoder,
decoder and cross-attention streams separately (decoder tokens from ``labels`` or
``decoder_input_ids``); ViT has no tokens in the batch at all: its FLOPs follow from the image
rows. None of these models accept restarting ``position_ids`` as document boundaries, so packed
rows are not a case here.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from tests.conftest import (
    LENGTHS,
    VOCAB,
    check_engine,
    full_batch,
    one_per_family,
    padded_batch,
    seq2seq_batch,
)

_BERT_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}

# name: (config class, model class, config arguments, LoRA targets)
ENCODERS = {
    "bert_mlm": ("BertConfig", "BertForMaskedLM", _BERT_LIKE, ["query", "value"]),
    "bert_classifier": (
        "BertConfig",
        "BertForSequenceClassification",
        {**_BERT_LIKE, "num_labels": 3},
        ["query", "value"],
    ),
    "roberta_mlm": (
        "RobertaConfig",
        "RobertaForMaskedLM",
        {**_BERT_LIKE, "bos_token_id": 1, "eos_token_id": 2},
        ["query", "value"],
    ),
    "roberta_classifier": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        {**_BERT_LIKE, "bos_token_id": 1, "eos_token_id": 2, "num_labels": 3},
        ["query", "value"],
    ),
}
SEQ2SEQ = {
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "vocab_size": VOCAB,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 3,
            "num_decoder_layers": 3,
            "num_heads": 4,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        },
        ["q", "v"],
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        {
            "vocab_size": VOCAB,
            "d_model": 32,
            "encoder_layers": 3,
            "decoder_layers": 3,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
        },
        ["q_proj", "v_proj"],
    ),
}
ALL = {**ENCODERS, **SEQ2SEQ}


def build(name: str) -> torch.nn.Module:
    config_class, model_class, arguments, _ = ALL[name]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments)).train()


def lora(name: str, model: torch.nn.Module) -> torch.nn.Module:
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL[name][3]))


def classification_labels(name: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A classifier takes one label per row, not per token."""
    if "classifier" in name:
        batch = {**batch, "labels": torch.arange(batch["input_ids"].shape[0]) % 3}
    return batch


def text_batches(name: str, rows: int) -> list[dict[str, torch.Tensor]]:
    return [classification_labels(name, full_batch(rows, length)) for length in LENGTHS]


def seq2seq_batches() -> list[dict[str, torch.Tensor]]:
    """Encoder and decoder of different lengths, padded rows in both, at both lengths. The decoder is
    never as wide as the encoder: the truth tells decoder labels from encoder columns by their width."""
    return [seq2seq_batch([length, length - 3, 2], [length - 2, 3, length + 1]) for length in LENGTHS]


def seq2seq_full_batches() -> list[dict[str, torch.Tensor]]:
    return [seq2seq_batch([length] * 2, [length - 2] * 2) for length in LENGTHS]


def seq2seq_template() -> dict[str, torch.Tensor]:
    return seq2seq_batch([9, 4], [5, 7])


# -- encoders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", one_per_family(ENCODERS, "bert_mlm"))
def test_encoder_full_fine_tuning(name: str) -> None:
    check_engine(build(name), classification_labels(name, full_batch(2, 9)), text_batches(name, 2))


@pytest.mark.parametrize("name", one_per_family(ENCODERS, "bert_mlm"))
def test_encoder_lora(name: str) -> None:
    model = lora(name, build(name))
    check_engine(model, classification_labels(name, full_batch(2, 9)), text_batches(name, 3))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", one_per_family(ENCODERS, "bert_mlm"))
def test_encoder_gradient_checkpointing(name: str, reentrant: bool) -> None:
    model = build(name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    check_engine(model, classification_labels(name, full_batch(2, 9)), text_batches(name, 2))


@pytest.mark.parametrize("name", one_per_family(ENCODERS, "bert_mlm"))
def test_encoder_padded_batch(name: str) -> None:
    """Classifiers go without labels here (the truth splits rows by their token mask; the loss has no
    matmul), masked LMs with token labels."""
    labels = "classifier" not in name
    batches = [padded_batch([length, length - 3, 2], labels=labels) for length in LENGTHS]
    check_engine(build(name), padded_batch([9, 4], labels=labels), batches)


# -- encoder-decoders --------------------------------------------------------------------------------
@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("name", one_per_family(SEQ2SEQ, "t5"))
def test_seq2seq_full_fine_tuning(name: str) -> None:
    check_engine(build(name), seq2seq_template(), seq2seq_full_batches())


@pytest.mark.slow  # the encoder-decoder's other unit tests cover the same counting
@pytest.mark.parametrize("name", one_per_family(SEQ2SEQ, "t5"))
def test_seq2seq_lora(name: str) -> None:
    check_engine(lora(name, build(name)), seq2seq_template(), seq2seq_full_batches())


@pytest.mark.slow  # the encoder-decoder's other unit tests cover the same counting
@pytest.mark.parametrize("name", one_per_family(SEQ2SEQ, "t5"))
def test_seq2seq_gradient_checkpointing(name: str) -> None:
    model = build(name)
    model.gradient_checkpointing_enable()
    check_engine(model, seq2seq_template(), seq2seq_full_batches())


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("name", one_per_family(SEQ2SEQ, "t5"))
def test_seq2seq_padded_batch(name: str) -> None:
    check_engine(build(name), seq2seq_template(), seq2seq_batches())


@pytest.mark.slow  # the encoder-decoder's other unit tests cover the same counting
@pytest.mark.parametrize("name", one_per_family(SEQ2SEQ, "t5"))
def test_seq2seq_with_decoder_input_ids(name: str) -> None:
    """The decoder stream given as ``decoder_input_ids`` instead of ``labels``, beside a padded encoder.
    Its rows are full: the truth splits rows by the encoder's mask and keeps a decoder row whole."""

    def with_decoder_inputs(encoder: list[int], decoder_length: int) -> dict[str, torch.Tensor]:
        batch = seq2seq_batch(encoder, [decoder_length] * len(encoder))
        batch["decoder_input_ids"] = batch.pop("labels")
        return batch

    batches = [with_decoder_inputs([length, length - 3, 2], length - 2) for length in LENGTHS]
    check_engine(build(name), with_decoder_inputs([9, 4], 5), batches)


@pytest.mark.slow  # the encoder-decoder's other unit tests cover the same counting
@pytest.mark.parametrize("name", one_per_family(SEQ2SEQ, "t5"))
def test_seq2seq_with_padded_decoder_inputs_of_the_encoder_width(name: str) -> None:
    """Both sides padded to the same width: each side's real lengths come from its own mask."""

    def padded_both(encoder: list[int], decoder: list[int]) -> dict[str, torch.Tensor]:
        batch = seq2seq_batch(encoder, decoder)
        labels = batch.pop("labels")
        width = batch["input_ids"].shape[1]
        assert labels.shape[1] == width
        batch["decoder_attention_mask"] = (labels != -100).long()
        batch["decoder_input_ids"] = labels.clamp(min=0)
        return batch

    batches = [padded_both([length, length - 3, 2], [length, 3, length - 1]) for length in LENGTHS]
    check_engine(build(name), padded_both([9, 4], [9, 5]), batches)


# -- vision ------------------------------------------------------------------------------------------
_VIT = {
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 5,
}


def vit(image_size: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(**{**_VIT, "image_size": image_size})
    return transformers.ViTForImageClassification(config).train()


def images(rows: int, size: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    return {
        "pixel_values": torch.randn(rows, 3, size, size, generator=generator),
        "labels": torch.arange(rows) % 5,
    }


def test_vit_full_fine_tuning() -> None:
    """Patches per image are fixed by the config: the FLOPs follow from the image rows."""
    check_engine(vit(), images(2), [images(1), images(3)])


@pytest.mark.parametrize("size", [8, 12])
def test_vit_image_sizes(size: int) -> None:
    """The two sequence lengths of a vision model: 4 and 9 patches (+ the class token)."""
    check_engine(vit(size), images(2, size), [images(1, size), images(3, size)])


def test_vit_lora() -> None:
    model = get_peft_model(
        vit(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
    )
    check_engine(model, images(2), [images(1), images(3)])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_vit_gradient_checkpointing(reentrant: bool) -> None:
    model = vit()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    check_engine(model, images(2), [images(1), images(3)])
