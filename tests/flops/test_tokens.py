"""Per-step token counting stays on the device: no operation that reads a value back or copies a host scalar.

CI has no GPU, so the batches live on the meta device and every aten operation of ``count`` is
recorded: an item read (``_local_scalar_dense``), a data-dependent shape (``nonzero``) or a host
scalar turned into a tensor (``scalar_tensor``, what ``tensor[i] = 5`` does) would be a host sync
on CUDA. ``benchmarks/check_counting_sync.py`` makes the same check on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from mfu_callbacks.flops.counting.attention_windows import AttentionWindow
from mfu_callbacks.flops.counting.tokens import TokenCounting
from mfu_callbacks.flops.features import NUM_FEATURES
from mfu_callbacks.testing import SYNCING_OPERATIONS, OperationLog


def batches(length: int) -> list[tuple[bool, dict[str, torch.Tensor]]]:
    ids = torch.zeros(4, length, dtype=torch.int64, device="meta")
    mask = torch.ones(4, length, dtype=torch.int64, device="meta")
    positions = torch.zeros(4, length, dtype=torch.int64, device="meta")
    labels = torch.zeros(4, length // 2, dtype=torch.int64, device="meta")
    boundaries = torch.zeros(5, dtype=torch.int32, device="meta")
    return [
        (False, {"input_ids": ids}),
        (False, {"input_ids": ids, "attention_mask": mask}),
        (False, {"input_ids": ids, "position_ids": positions}),
        (False, {"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": boundaries}),
        (True, {"input_ids": ids, "attention_mask": mask, "labels": labels}),
    ]


WINDOWS = {
    "windows": (AttentionWindow(4), AttentionWindow(8, chunked=True)),
    "kernel_windows": (AttentionWindow(4), None),
}


@pytest.mark.parametrize("pad_token_id", [None, 0])  # a pad id makes packed rows look for trailing pads
@pytest.mark.parametrize("windowed", [False, True], ids=["full-attention", "attention-windows"])
@pytest.mark.parametrize("length", [9, 16])
def test_counting_new_and_repeated_shapes_never_reads_the_device(
    length: int, windowed: bool, pad_token_id: int | None
) -> None:
    options: dict = WINDOWS if windowed else {}
    counters = {
        flag: TokenCounting(
            encoder_decoder=flag, attention_per_document=windowed, pad_token_id=pad_token_id, **options
        )
        for flag in (False, True)
    }
    for _ in range(2):  # the first count of a shape builds its layout, the second reuses it
        for encoder_decoder, batch in batches(length):
            with OperationLog() as log:
                features = counters[encoder_decoder].count(batch)
            assert features.shape == (2, NUM_FEATURES) and features.device.type == "meta"
            assert not SYNCING_OPERATIONS & set(log.operations), log.operations


def test_a_repeated_shape_costs_few_operations() -> None:
    counting = TokenCounting(encoder_decoder=False, attention_per_document=False)
    _, batch = batches(12)[1]
    counting.count(batch)
    with OperationLog() as log:
        counting.count(batch)
    kernels = [
        op
        for op in log.operations
        if op not in ("aten.view", "aten.unsqueeze", "aten.select", "aten._to_copy")
    ]
    assert len(kernels) <= 7, kernels
