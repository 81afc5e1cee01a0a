"""Bad input gets an error that names what was looked for and how to supply it; never a silent zero."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from mfu_callbacks import estimate_step_flops
from mfu_callbacks.flops import BatchError, FlopEngine, ModelIntrospectionError
from tests.conftest import full_batch
from tests.flops.test_moe import build as build_moe
from tests.flops.test_plain import gpt, gpt_forward


def test_batch_without_tokens_names_the_keys_and_token_counter() -> None:
    with pytest.raises(BatchError) as error:
        estimate_step_flops(gpt(), {"features": torch.randn(2, 5)}, forward=gpt_forward)
    message = str(error.value)
    assert "input_ids" in message and "pixel_values" in message and "token_counter=" in message
    assert "features" in message  # the keys the batch did have


def test_token_counter_supplies_the_tokens() -> None:
    batch = {"tokens": full_batch(2, 7)["input_ids"]}
    step = estimate_step_flops(
        gpt(),
        batch,
        forward=lambda model, b: model(b["tokens"]),
        token_counter=lambda b: {"input_ids": b["tokens"]},
    )
    assert step.tokens == 14 and step.model_flops > 0


def test_batch_without_any_tensor() -> None:
    with pytest.raises(BatchError, match="token_counter="):
        estimate_step_flops(gpt(), ["no", "tensors"], forward=gpt_forward)


def test_model_that_cannot_be_traced_names_forward() -> None:
    """A Linear does not take ``input_ids=``: the error says to pass forward=."""
    with pytest.raises(ModelIntrospectionError, match="forward="):
        FlopEngine.from_model(nn.Linear(4, 4), full_batch(2, 5))


class ReadsItsData(nn.Module):
    """A forward that reads a value back to the host: impossible on the meta device, whatever forward= says."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.zeros(int(ids.sum()), 4))


def test_model_reading_its_data_is_an_introspection_error() -> None:
    with pytest.raises(ModelIntrospectionError, match="forward="):
        FlopEngine.from_model(
            ReadsItsData(), full_batch(2, 5), forward=lambda model, batch: model(batch["input_ids"])
        )


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)], ids=["zero_length", "zero_rows"])
def test_empty_batch_is_a_value_error(shape: tuple[int, int]) -> None:
    engine = FlopEngine.from_model(gpt(), full_batch(2, 7), forward=gpt_forward)
    empty = {"input_ids": torch.zeros(shape, dtype=torch.long)}
    with pytest.raises(ValueError, match="no tokens to count"):
        engine.estimate(empty)
    with pytest.raises(ValueError, match="no tokens to count"):
        FlopEngine.from_model(gpt(), empty, forward=gpt_forward)


def test_negative_counts_are_a_value_error() -> None:
    engine = FlopEngine.from_model(gpt(), full_batch(2, 7), forward=gpt_forward)
    features = engine.count(full_batch(2, 7))
    features[:, 1] = -3
    with pytest.raises(ValueError, match="negative"):
        engine.evaluate(features)


def test_one_log_line_says_which_path_each_part_took(caplog: pytest.LogCaptureFixture) -> None:
    """Traced on a replica, repeated layers folded, MoE experts counted from their shapes: one INFO line."""
    with caplog.at_level(logging.INFO, logger="mfu_callbacks"):
        FlopEngine.from_model(build_moe("olmoe"), full_batch(2, 7))
    lines = [record.getMessage() for record in caplog.records if record.name == "mfu_callbacks"]
    assert len(lines) == 1
    line = lines[0]
    assert "traced on a meta-device replica" in line
    assert "model.layers.1 x3" in line  # four identical layers: the first alone, one standing for three
    assert "mlp.experts (MoE experts" in line
    assert "experts" in line.split("components:")[1]
