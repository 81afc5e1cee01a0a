"""The building blocks of a layout's plan (``flops/layouts.py``): TRL's trailing pads, feature rows taken
whole and summed over many micro-batches, host-known constants, and the flattened cell index. Expected
values are counted by hand on small tensors."""

from __future__ import annotations

import torch

from mfu_callbacks.flops.counting.layouts import trailing_pads
from mfu_callbacks.flops.counting.plans import cell, constant_plan, filled, whole_plan
from mfu_callbacks.flops.features import HARDWARE, MODEL, NUM_FEATURES, Feature

CPU = torch.device("cpu")


def test_only_a_trailing_run_of_pad_tokens_at_position_zero_is_padding():
    # Row 0: two documents (3 and 2 tokens), then 3 pads. Row 1: a genuine one-token document of
    # another id ends the row. Row 2: a pad id inside a document (position 1) is a token, not padding.
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 7, 8, 9, 4, 3, 2], [5, 0, 7, 8, 9, 6, 7, 0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 0]])
    assert trailing_pads(ids, positions, pad_token_id=0).tolist() == [3, 0, 1]
    assert trailing_pads(ids, positions, pad_token_id=99).tolist() == [0, 0, 0]


def test_feature_rows_taken_whole_sum_over_micro_batches_and_keep_the_last_step_apart():
    shape = (2, NUM_FEATURES)
    plan = whole_plan(2 * NUM_FEATURES, shape, CPU)
    rows = [torch.arange(2 * NUM_FEATURES).view(shape) * step for step in (1, 2, 3)]
    owned = [(row.reshape(1, -1),) for row in rows]
    assert torch.equal(plan.features(owned[1]), rows[1])  # one micro-batch: its features back
    assert plan.group is not None
    sums = plan.group.reduce(owned, last_from=(2,))  # the last step: the third micro-batch
    index = plan.group.index()
    window = torch.zeros(2 * NUM_FEATURES, dtype=torch.int64).index_add(0, index, sums[0])
    last = torch.zeros(2 * NUM_FEATURES, dtype=torch.int64).index_add(0, index, sums[1])
    assert torch.equal(window.view(shape), rows[0] * 6)  # 1 + 2 + 3 times the base row
    assert torch.equal(last.view(shape), rows[0] * 3)


def test_a_plan_of_host_constants_takes_nothing_and_gives_its_constants():
    constants = [0] * (2 * NUM_FEATURES)
    constants[cell(MODEL, Feature.TOKENS)] = 40
    constants[cell(HARDWARE, Feature.TOKENS)] = 64
    plan = constant_plan(constants, (2, NUM_FEATURES), CPU)
    assert plan.group is None and plan.take({"input_ids": torch.zeros(2, 32)}) == ()
    features = plan.features(())
    assert int(features[MODEL, Feature.TOKENS]) == 40 and int(features[HARDWARE, Feature.TOKENS]) == 64
    assert int(features.sum()) == 104


def test_the_flattened_cells_put_the_hardware_row_after_the_model_row():
    assert cell(MODEL, Feature.TOKENS) == int(Feature.TOKENS)
    assert cell(HARDWARE, Feature.TOKENS) == NUM_FEATURES + int(Feature.TOKENS)
    assert filled((0, 7, 0, 3), CPU).tolist() == [0, 7, 0, 3]
