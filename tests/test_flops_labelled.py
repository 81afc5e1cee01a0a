"""Labelled positions (``Feature.LABELLED``): what a head that scores only those multiplies, read from
the batch as TRL's collators and trainers give it, against a count by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import packed_batch, padded_batch

from mfu_callbacks.flops.features import HARDWARE, MODEL, Feature
from mfu_callbacks.flops.tokens import TokenCounting


def labelled(batch: dict[str, torch.Tensor], encoder_decoder: bool = False) -> tuple[int, int]:
    counting = TokenCounting(encoder_decoder=encoder_decoder, attention_per_document=False)
    features = counting.count(batch)
    return int(features[MODEL, Feature.LABELLED]), int(features[HARDWARE, Feature.LABELLED])


def with_prompts(batch: dict[str, torch.Tensor], prompts: list[int]) -> dict[str, torch.Tensor]:
    for row, prompt in enumerate(prompts):
        batch["labels"][row, :prompt] = -100
    return batch


def test_labels_count_the_positions_whose_next_token_is_labelled() -> None:
    batch = with_prompts(padded_batch([5, 12, 7]), [2, 6, 0])
    expected = int((batch["labels"][:, 1:] != -100).sum())
    assert expected == (5 - 2) + (12 - 6) + (7 - 1)
    assert labelled(batch) == (expected, expected)


def test_shift_labels_are_counted_as_they_are() -> None:
    batch = padded_batch([5, 12])
    batch["shift_labels"] = torch.nn.functional.pad(batch.pop("labels")[:, 1:], (0, 1), value=-100)
    assert labelled(batch) == (4 + 11, 4 + 11)


@pytest.mark.parametrize("key", ["completion_mask", "assistant_masks"])
def test_trl_masks_count_like_the_labels_made_from_them(key: str) -> None:
    batch = padded_batch([6, 9], labels=False)
    mask = torch.zeros_like(batch["input_ids"])
    mask[0, 3:6] = 1
    mask[1, 2:9] = 1
    batch[key] = mask
    labels = batch["input_ids"].masked_fill(mask == 0, -100)  # how TRL's DPO builds the head's labels
    expected = int((labels[:, 1:] != -100).sum())
    assert labelled(batch) == (expected, expected) == (3 + 7, 3 + 7)


def test_labels_win_over_a_mask_and_a_per_row_label_is_none() -> None:
    batch = padded_batch([6, 9])
    batch["completion_mask"] = torch.zeros_like(batch["input_ids"])
    assert labelled(batch) == (5 + 8, 5 + 8)
    classified = padded_batch([6, 9], labels=False)
    classified["labels"] = torch.tensor([1, 0])  # sequence classification
    assert labelled(classified) == (0, 0)


def test_packed_rows_count_the_labels_the_collator_kept() -> None:
    batch = packed_batch([4, 6, 2])
    positions = batch["position_ids"]
    batch["labels"][positions == 0] = -100  # TRL's padding-free collator: no label across documents
    assert labelled(batch) == (3 + 5 + 1, 3 + 5 + 1)


def test_an_encoder_decoder_batch_has_no_labelled_positions_of_the_main_stream() -> None:
    batch = padded_batch([6, 9], labels=False)
    batch["labels"] = torch.tensor([[5, 6, -100], [7, 8, 9]])
    assert labelled(batch, encoder_decoder=True) == (0, 0)


def test_labelled_positions_are_summed_over_deferred_micro_batches() -> None:
    from mfu_callbacks._step_counts import StepCounts

    counting = TokenCounting(encoder_decoder=False, attention_per_document=False)
    batches = [with_prompts(padded_batch([5, 12]), [3, 1]), with_prompts(padded_batch([8, 8]), [7, 0])]
    counts = StepCounts()
    for batch in batches:
        counts.add_deferred(*counting.defer(batch))
        counts.end_step()
    window, last = counts.take()
    expected = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert int(window[MODEL, Feature.LABELLED]) == sum(expected)
    assert int(last[MODEL, Feature.LABELLED]) == expected[1]
