"""Labelled positions (``Feature.LABELLED``): what a head that scores only those multiplies, read from
the batch as TRL's collators and trainers give it, against a count by hand."""

from __future__ import annotations

import pytest
import torch

from mfu_callbacks.flops.counting.tokens import TokenCounting
from mfu_callbacks.flops.features import HARDWARE, MODEL, Feature
from tests.conftest import packed_batch, padded_batch


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
    window, last = counts.drain()
    expected = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert int(window[MODEL, Feature.LABELLED]) == sum(expected)
    assert int(last[MODEL, Feature.LABELLED]) == expected[1]


# -- TRL's fused head on its CUDA path, forced on CPU -------------------------------------------------
def labelled_twin_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The unfused twin of a head that scores only the labelled positions: the same projection on them."""
    from tests.flops.test_observe import _causal_lm

    lm = _causal_lm(model)
    hidden = lm.model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logits = lm.lm_head(hidden[:, :-1][mask])
    return torch.nn.functional.cross_entropy(logits.float(), targets[mask])


@pytest.mark.slow
@pytest.mark.parametrize("longest", [24, 60])
def test_trl_fused_head_on_its_labelled_positions_is_logged_within_one_percent_in_every_row(
    tmp_path, monkeypatch, longest: int
) -> None:
    """TRL scores only the labelled positions where Triton runs (``_use_triton``); here that device check
    says yes on CPU, as TRL's own tests patch its module attributes. Completion-only loss on rows whose
    prompt share varies from step to step: each row's logged model FLOPs against the twin's, step by step."""
    import trl.trainer.utils
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mfu_callbacks.testing import word_tokenizer
    from mfu_callbacks.transformers import MFUCallback
    from tests.conftest import VOCAB, model_truth
    from tests.flops.test_observe import llama

    monkeypatch.setattr(trl.trainer.utils, "_use_triton", lambda device: True)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(32):
        length = int(torch.randint(6, longest, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
        rows.append(
            {
                "input_ids": torch.randint(3, VOCAB, (length,), generator=generator).tolist(),
                "completion_mask": [0] * prompt + [1] * (length - prompt),
            }
        )
    model = llama()
    steps: list[list[dict]] = []

    class Batches(TrainerCallback):
        def on_step_begin(self, *args, **kwargs) -> None:
            steps.append([])

    def keep(module, args, kwargs) -> None:
        if steps and kwargs.get("fused_lm_head"):
            steps[-1].append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    model.register_forward_pre_hook(keep, with_kwargs=True)
    callback = MFUCallback(peak_tflops=1.0, warmup_steps=1)
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=longest, completion_only_loss=True,
        gradient_checkpointing=False,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=word_tokenizer(VOCAB),
        callbacks=[Batches(), callback],
    )  # fmt: skip
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == len(steps) == 6
    shares = set()
    for row, batches in list(zip(logged, steps))[2:]:  # warm-up, then the step that built the engine
        truth = sum(model_truth(trainer.model, batch, labelled_twin_forward) for batch in batches)
        flops = row["tflops_per_gpu"] * 1e12 * row["step_time"]
        assert abs(flops / truth - 1) <= 0.01, (flops, truth)
        scored = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        shares.add(round(scored / sum(int(b["attention_mask"].sum()) for b in batches), 2))
    assert len(shares) > 1, "the labelled share never moved"
