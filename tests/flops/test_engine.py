"""The FLOP engine's own surface (``flops/engine.py``): the deferred count the meter holds gives the
FLOPs of the batch (against torch's FlopCounterMode at two lengths), micro-batches add up, and counts
that cannot come from a batch are refused."""

from __future__ import annotations

import pytest
import torch

from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.testing import causal_lm, make_eager
from tests.conftest import LENGTHS, VOCAB, assert_flops, full_batch, model_truth, padded_batch


@pytest.fixture(scope="module")
def llama_and_engine() -> tuple[torch.nn.Module, FlopEngine]:
    model = causal_lm(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, vocab=VOCAB)
    engine = FlopEngine.from_model(model, full_batch(2, 9))
    make_eager(model)
    return model, engine


@pytest.mark.parametrize("length", LENGTHS)
def test_the_deferred_count_gives_the_flops_of_the_batch(llama_and_engine, length):
    model, engine = llama_and_engine
    batch = padded_batch([length, length - 3])
    plan, owned = engine.defer(batch)
    step = engine.evaluate(plan.features(owned))
    assert_flops(step.model_flops, model_truth(model, batch), "model FLOPs")
    assert step.tokens == 2 * length - 3 and step.padded_tokens == 2 * length


def test_the_features_of_two_micro_batches_add_up_to_their_flops(llama_and_engine):
    _, engine = llama_and_engine
    first, second = full_batch(2, LENGTHS[0]), padded_batch([LENGTHS[1], 4])
    together = engine.evaluate(engine.count(first) + engine.count(second))
    apart = [engine.estimate(first), engine.estimate(second)]
    assert together.model_flops == sum(step.model_flops for step in apart)
    assert together.hardware_flops == sum(step.hardware_flops for step in apart)


def test_negative_counts_are_refused(llama_and_engine):
    _, engine = llama_and_engine
    features = engine.count(full_batch(1, 4))
    features[0, 0] = -1
    with pytest.raises(ValueError, match="negative token counts"):
        engine.evaluate(features)
