"""Counting deferred to the read: exact over mixed layouts, folds, reads mid-step and discarded steps;
one operation per micro-batch on the training step, and bounded memory.

The meter's totals are checked against torch's FlopCounterMode on a tiny Llama; the deferred path's
sums against the same batches counted one by one (``TokenCounting.count``, which the FLOP tests check
against FlopCounterMode batch by batch).
"""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from mfu_callbacks import MFUMeter
from mfu_callbacks import _step_counts as step_counts
from mfu_callbacks._step_counts import StepCounts
from mfu_callbacks.flops.counting.attention_windows import AttentionWindow
from mfu_callbacks.flops.counting.tokens import TokenCounting
from mfu_callbacks.testing import SYNCING_OPERATIONS, OperationLog, causal_lm
from mfu_callbacks.timer import StepTimer
from tests.conftest import VOCAB, full_batch, model_truth, packed_batch, padded_batch, seq2seq_batch
from tests.helpers.fakes import FakeClock

WINDOWED = {
    "windows": (AttentionWindow(4), AttentionWindow(8, chunked=True)),
    "kernel_windows": (AttentionWindow(4), None),
}


def with_boundaries(documents: list[int], pads: int = 0) -> dict[str, torch.Tensor]:
    """Flattened documents with ``cu_seq_lens`` (and, with ``pads``, TRL's trailing pad tokens: id 0 at position 0)."""
    batch = packed_batch([*documents, *([1] * pads)])
    if pads:
        batch["input_ids"][0, -pads:] = 0
    lengths = torch.tensor([0, *documents, *([1] * pads)]).cumsum(0).to(torch.int32)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = lengths
    return batch


def decoder_batches() -> list[dict[str, torch.Tensor]]:
    with_mask = seq2seq_batch([5, 3], [2, 4])
    with_mask["decoder_input_ids"] = with_mask.pop("labels").clamp(min=0)
    with_mask["decoder_attention_mask"] = (with_mask["decoder_input_ids"] > 0).long()
    return [seq2seq_batch([6, 2, 4], [3, 1, 2]), seq2seq_batch([7, 7], [5, 2]), with_mask, full_batch(2, 5)]


def decoder_only_batches() -> list[dict[str, torch.Tensor]]:
    return [
        padded_batch([5, 9, 3]),
        padded_batch([12, 2]),
        full_batch(2, 8),
        packed_batch([4, 6, 2]),
        packed_batch([3, 3, 3, 5]),
        with_boundaries([5, 2, 9]),
        with_boundaries([3, 4], pads=3),
        {
            "input_ids": packed_batch([2, 5])["input_ids"],
            "position_ids": torch.tensor([[0, 1, 0, 1, 2, 3, 4]]),
        },
        {"pixel_values": torch.zeros(3, 3, 4, 4)},
    ]


def counters() -> list[tuple[TokenCounting, list[dict[str, torch.Tensor]]]]:
    return [
        (
            TokenCounting(encoder_decoder=False, attention_per_document=True, pad_token_id=0, **WINDOWED),
            decoder_only_batches(),
        ),
        (TokenCounting(encoder_decoder=False, attention_per_document=False), decoder_only_batches()),
        (TokenCounting(encoder_decoder=True, attention_per_document=False), decoder_batches()),
    ]


def one_by_one(counting: TokenCounting, step: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    total = sum((counting.count(batch) for batch in step), torch.zeros_like(counting.count(step[0])))
    return total.tolist()


def steps_of(batches: list[dict[str, torch.Tensor]], count: int) -> list[list[dict[str, torch.Tensor]]]:
    """``count`` steps of one to three micro-batches of mixed layouts."""
    return [[batches[(step + k) % len(batches)] for k in range(1 + step % 3)] for step in range(count)]


def check(
    counting: TokenCounting,
    unread: list[list[dict[str, torch.Tensor]]],
    window: torch.Tensor,
    last: torch.Tensor,
) -> None:
    """A read's window and last step against the unread steps' batches counted one by one; clears them."""
    expected = [one_by_one(counting, step) for step in unread]
    zero = torch.zeros_like(window).tolist()
    assert window.tolist() == (torch.tensor(expected).sum(0).tolist() if expected else zero)
    assert last.tolist() == (expected[-1] if expected else zero)
    unread.clear()


# -- exact -----------------------------------------------------------------------------------------
def test_the_meter_counts_mixed_layouts_and_a_read_mid_step_as_flop_counter_mode_does():
    """A tiny Llama's measured steps of padded, packed and flattened micro-batches (gradient accumulation,
    a read in the middle of a step) against FlopCounterMode on each real sequence."""
    model = causal_lm(
        hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=VOCAB, attention="eager"
    )
    clock = FakeClock()
    meter = MFUMeter(model, peak_tflops=1.0, real_step="off", timer=StepTimer(0, clock=clock, force_cpu=True))
    steps = [
        [padded_batch([5, 9, 3]), packed_batch([4, 6, 2])],
        [full_batch(2, 8)],
        [with_boundaries([5, 2, 9]), padded_batch([12, 2]), packed_batch([3, 3, 3, 5])],
    ]
    meter.start_step(full_batch(1, 4))  # builds the engine: this step is left out
    meter.end_step()
    for index, step in enumerate(steps):
        clock.advance(0.1)
        meter.start_step(step[0])
        for position, batch in enumerate(step[1:]):
            if index == 2 and position == 1:
                assert meter.metrics()  # read with a step open: its first micro-batches stay with it
            meter.add_batch(batch)
        clock.advance(1.0)
        meter.end_step()
    meter.metrics()
    counted = meter.run_flops()
    assert counted is not None
    truth = sum(model_truth(model, batch) for step in steps for batch in step)
    assert counted.model_flops == truth


@pytest.mark.parametrize("on_host", [False, True], ids=["reduced-on-device", "copied-to-host"])
@pytest.mark.parametrize(
    "rows, max_bytes", [(64, 2**24), (4, 2**24), (2, 1)], ids=["held", "folded", "tiny-buffer"]
)
def test_deferred_sums_equal_batches_counted_one_by_one(
    rows: int, max_bytes: int, on_host: bool, monkeypatch
):
    """Window and last step over mixed layouts, with folds of full buffers (``rows``) and of a step's own
    micro-batches (``max_bytes``), reads after each few steps and a read in the middle of a step; the
    small windows of a GPU (concatenated per tensor, copied, reduced on the host) taken by every group."""
    monkeypatch.setattr(step_counts, "_reduce_on_host", lambda group, owned: on_host)
    for counting, batches in counters():
        counts = StepCounts(rows=rows, max_bytes=max_bytes)
        steps = steps_of(batches, 23)
        unread: list[list[dict[str, torch.Tensor]]] = []  # finished steps since the last read
        for index, step in enumerate(steps):
            for position, batch in enumerate(step):
                counts.add_deferred(*counting.defer(batch))
                if index % 7 == 6 and position == 0:  # a read mid-step leaves the open step alone
                    check(counting, unread, *counts.drain())
            counts.end_step()
            unread.append(step)
            if index % 5 == 4:
                check(counting, unread, *counts.drain())
        check(counting, unread, *counts.drain())


def test_a_discarded_step_counts_nothing_and_the_next_counts_alone():
    counting, batches = counters()[0]
    counts = StepCounts(rows=4)
    counts.add_deferred(*counting.defer(batches[0]))
    counts.add_deferred(*counting.defer(batches[3]))
    counts.leave_out_open_step()
    counts.add_deferred(*counting.defer(batches[5]))
    counts.end_step()
    window, last = counts.drain()
    assert window.tolist() == last.tolist() == one_by_one(counting, [batches[5]])


def test_a_batch_refilled_in_place_after_its_step_keeps_its_count():
    """A loop may refill a static input buffer (CUDA graphs): only tensors the counting owns are held."""
    for counting, batches in counters():
        counts = StepCounts()
        for batch in batches:
            step = {key: value.clone() for key, value in batch.items()}
            expected = one_by_one(counting, [step])
            counts.add_deferred(*counting.defer(step))
            counts.end_step()
            for value in step.values():
                value.fill_(1 if value.dtype != torch.bool else True)  # what the next batch would write
            window, last = counts.drain()
            assert last.tolist() == expected, sorted(batch)


# -- cheap on the training step, bounded in memory --------------------------------------------------
def meta(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to("meta") for key, value in batch.items()}


@pytest.mark.parametrize("case", range(3), ids=["windows-and-pads", "plain", "encoder-decoder"])
def test_a_micro_batch_launches_at_most_one_operation_and_never_syncs(case: int):
    """On meta tensors (CI has no GPU) every aten operation shows: per micro-batch of a layout seen
    before, one operation (two for flattened documents checked for trailing pads), and one more for a
    decoder-only batch's labelled positions; none reads the device."""
    counting, batches = counters()[case]
    for batch in map(meta, batches):
        counting.defer(batch)  # the first batch of a layout decides its plan
        with OperationLog() as log:
            counting.defer(batch)
        allowed = 2 if "cu_seq_lens_q" in batch and counting.pad_token_id is not None else 1
        allowed += "labels" in batch and not counting.encoder_decoder
        assert len(log.operations) <= allowed, (sorted(batch), log.operations)
        assert not SYNCING_OPERATIONS & set(log.operations)


def test_a_read_costs_the_same_operations_for_ten_steps_as_for_fifty():
    """Held micro-batches of a layout are reduced together: a read's operations do not grow with steps."""
    counting = TokenCounting(encoder_decoder=False, attention_per_document=False)
    operations = []
    for steps in (10, 50):
        counts = StepCounts()
        for step in range(steps):
            counts.add_deferred(*counting.defer(padded_batch([5 + step % 4, 9, 3])))
            counts.end_step()
        with OperationLog() as log:
            counts.drain()
        assert not SYNCING_OPERATIONS & set(log.operations) - {"aten._local_scalar_dense"}
        operations.append(len(log.operations))
    assert operations[0] == operations[1] and operations[0] < 25, operations


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_ten_thousand_deferred_steps_without_a_read_stay_within_two_megabytes():
    counting = TokenCounting(encoder_decoder=False, attention_per_document=True, pad_token_id=0, **WINDOWED)
    batches = [padded_batch([5, 9, 3]), with_boundaries([3, 4], pads=3), packed_batch([4, 6, 2])]
    counts = StepCounts()
    for step in range(1000):  # warm: plans made, allocator pools filled
        counts.add_deferred(*counting.defer(batches[step % 3]))
        counts.end_step()
    counts.drain()
    tracemalloc.start()
    python_before, rss_before = tracemalloc.get_traced_memory()[0], _resident_bytes()
    for step in range(9999):
        counts.add_deferred(*counting.defer(batches[step % 3]))
        counts.end_step()
    python_growth = tracemalloc.get_traced_memory()[0] - python_before
    rss_growth = _resident_bytes() - rss_before
    tracemalloc.stop()
    assert python_growth < 2 * 2**20, f"Python objects grew by {python_growth / 2**20:.2f} MB"
    assert rss_growth < 2 * 2**20, f"resident memory grew by {rss_growth / 2**20:.2f} MB"
    window, _ = counts.drain()  # and nothing was lost
    each = torch.tensor([one_by_one(counting, [batch]) for batch in batches])
    assert window.tolist() == (3333 * each.sum(0)).tolist()


@pytest.mark.parametrize("rows", [64, 4], ids=["held", "folded"])
def test_a_read_of_the_oldest_steps_leaves_the_newer_ones_for_the_next(rows: int):
    """What a read that does not wait for the GPU does: take the steps the device finished, at a step
    boundary (a fold of several steps is taken whole), and leave the rest counted for the next read."""
    counting, batches = counters()[0]
    counts = StepCounts(rows=rows)
    steps = steps_of(batches, 11)
    for step in steps:
        for batch in step:
            counts.add_deferred(*counting.defer(batch))
        counts.end_step()
    taken = counts.step_boundary(9)
    assert 9 <= taken <= 11
    if rows == 64:
        assert taken == 9  # no fold: any step is a boundary
    check(counting, steps[:taken], *counts.drain(taken))
    if taken < 11:
        check(counting, steps[taken:], *counts.drain(counts.step_boundary(11 - taken)))
    assert counts.step_boundary(1) == 0  # nothing left
