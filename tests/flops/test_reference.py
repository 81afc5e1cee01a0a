"""Hand-computed cases: torch's FlopCounterMode (the referee of every other test) and the engine
must both equal the formula, 2*m*n*k per matmul, with the backward rules of the project's
conventions (an input gradient where anything upstream trains, a weight gradient where the weight trains).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfu_callbacks.flops import FlopEngine
from tests.conftest import step_truth

ROWS, IN_FEATURES, OUT_FEATURES = 4, 16, 8


class ScaledLinear(nn.Module):
    """A Linear behind an elementwise scale: the scale, when trainable, makes the Linear's input need a gradient."""

    def __init__(self, scale_trains: bool, weight_trains: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(IN_FEATURES), requires_grad=scale_trains)
        self.linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False).requires_grad_(weight_trains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.scale)


def first_of(model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


# (scale trains, weight trains): products of the backward besides the forward's one
LINEAR_CASES = {
    "full_fine_tuning_data_input": (False, True, 1),  # weight gradient only: nothing upstream trains
    "full_fine_tuning_trained_input": (True, True, 2),  # weight and input gradients
    "frozen_weight_trained_input": (True, False, 1),  # input gradient only
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear(case: str) -> None:
    scale_trains, weight_trains, backward_products = LINEAR_CASES[case]
    model = ScaledLinear(scale_trains, weight_trains)
    batch = (torch.randn(ROWS, IN_FEATURES),)
    expected = (1 + backward_products) * 2 * ROWS * IN_FEATURES * OUT_FEATURES
    assert step_truth(model, batch, first_of) == expected
    step = FlopEngine.from_model(model, (torch.randn(3, IN_FEATURES),), forward=first_of).estimate(batch)
    assert step.model_flops == step.hardware_flops == expected


class AttentionBlock(nn.Module):
    """Token embedding, then one multi-head self-attention with four bias-free projections, written out."""

    def __init__(self, vocab: int = 32, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(width, width, bias=False) for _ in range(4)
        )
        self.heads = heads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        rows, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(rows, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = torch.softmax(q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5, dim=-1)
        return self.o_proj((scores @ v).transpose(1, 2).reshape(rows, length, width))


def ids_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"])


@pytest.mark.parametrize("length", [5, 7])
def test_attention_block(length: int) -> None:
    """Forward: four projections 2*L*d*d each, scores and values 2*L*L*d each (over all heads).
    Everything trains, the embedding included, so every matmul's backward is twice its forward."""
    rows, width = 2, 16
    model = AttentionBlock(width=width)
    batch = {"input_ids": torch.randint(0, 32, (rows, length))}
    forward = rows * (4 * 2 * length * width * width + 2 * 2 * length * length * width)
    expected = 3 * forward
    assert step_truth(model, batch, ids_forward) == expected
    engine = FlopEngine.from_model(model, {"input_ids": torch.randint(0, 32, (3, 9))}, forward=ids_forward)
    step = engine.estimate(batch)
    assert step.model_flops == step.hardware_flops == expected
    assert step.breakdown["attention_scores"] == 3 * rows * 2 * 2 * length * length * width
