"""Token counting of batches of new shapes, padded, packed and encoder-decoder, under sync debug "error":
counted at once (``count``) and deferred (``defer``, held by ``StepCounts`` through its folds).

python benchmarks/check_counting_sync.py
"""

from __future__ import annotations

import torch

from mfu_callbacks._step_counts import StepCounts
from mfu_callbacks.flops.counting.attention_windows import AttentionWindow
from mfu_callbacks.flops.counting.tokens import TokenCounting


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    counting = TokenCounting(encoder_decoder=False, attention_per_document=False)
    seq2seq = TokenCounting(encoder_decoder=True, attention_per_document=False)
    windowed = TokenCounting(  # a sliding window the kernel computes (flash attention), and chunks
        encoder_decoder=False,
        attention_per_document=True,
        windows=(AttentionWindow(16), AttentionWindow(32, chunked=True)),
        kernel_windows=(AttentionWindow(16), None),
    )
    batches = []
    for length in (17, 33, 64, 65):
        ids = torch.randint(0, 100, (4, length), device=device)
        mask = torch.ones_like(ids)
        mask[:, length // 2 :] = 0
        positions = torch.arange(length, device=device).remainder(7).expand(4, length)
        cumulative = torch.tensor([0, length // 3, length], device=device)
        batches += [
            (counting, {"input_ids": ids}),
            (counting, {"input_ids": ids, "attention_mask": mask}),
            (counting, {"input_ids": ids, "position_ids": positions}),
            (seq2seq, {"input_ids": ids, "attention_mask": mask, "labels": ids[:, : length // 2]}),
            (windowed, {"input_ids": ids, "attention_mask": mask}),
            (windowed, {"input_ids": ids, "position_ids": positions}),
            (windowed, {"input_ids": ids[:1], "cu_seq_lens_q": cumulative}),
        ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    features = [counter.count(batch) for counter, batch in batches]
    held = [StepCounts(rows=4) for _ in (counting, seq2seq, windowed)]
    slot = {id(counting): 0, id(seq2seq): 1, id(windowed): 2}
    for _ in range(3):  # plans made, then reused; a fold every few steps
        for counter, batch in batches:
            counts = held[slot[id(counter)]]
            counts.add_deferred(*counter.defer(batch))
            counts.end_step()
    torch.cuda.set_sync_debug_mode(0)
    for counts, counter in zip(held, (counting, seq2seq, windowed)):
        window, _ = counts.drain()
        expected = sum(
            (f.cpu() for f, (c, _) in zip(features, batches) if c is counter), torch.zeros_like(window)
        )
        assert window.tolist() == (3 * expected).tolist(), "deferred counts differ from counts at once"
    print(
        f"{len(features)} batches of {len(batches) // 4} layouts and 4 new lengths counted under "
        f"set_sync_debug_mode('error'), at once and deferred (with folds): no host sync; deferred sums exact"
    )


if __name__ == "__main__":
    main()
