"""What transformers' SDPA path runs on a packed row, and what that attention costs on this GPU.

One layer of the GPU table's Llama (hidden 2048, 16 heads, 8 KV heads) runs forward and backward on
one row of 8192 tokens holding four documents marked only by restarting ``position_ids`` (no
attention mask), with ``F.scaled_dot_product_attention`` watched: the shapes, mask and
``is_causal`` it is called with. Then SDPA forward + backward on (1, 16, 8192, 128) bf16 tensors,
causal over the whole row against a block-diagonal boolean mask of four equal documents (2-D
and 4-D), in ms per call: what `mfu-callbacks doctor` must time for packed rows.

    python benchmarks/probe_packed_sdpa.py          # on a GPU, seconds
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mfu_callbacks.doctor.timing import block_causal_mask
from mfu_callbacks.testing import causal_lm

LENGTH, DOCUMENTS = 8192, (1024, 2048, 512, 4608)


def calls_on_a_packed_row(device: torch.device) -> list[tuple]:
    model = causal_lm(
        hidden=2048, layers=1, heads=16, kv_heads=8, intermediate=5440, vocab=32000, max_positions=LENGTH
    ).to(device)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def watched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **options):
        mask = None if attn_mask is None else (tuple(attn_mask.shape), str(attn_mask.dtype))
        calls.append((tuple(query.shape), tuple(key.shape), mask, is_causal))
        return sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **options
        )

    F.scaled_dot_product_attention = watched
    try:
        positions = torch.cat([torch.arange(n) for n in DOCUMENTS])[None].to(device)
        ids = torch.randint(0, 32000, (1, LENGTH), device=device)
        with torch.autocast(device.type, torch.bfloat16):
            model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    finally:
        F.scaled_dot_product_attention = sdpa
    return calls


def milliseconds(function, repeats: int = 10) -> float:
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    device = torch.device("cuda")
    print("SDPA calls (query, key, mask, is_causal):", calls_on_a_packed_row(device))
    tensors = [
        torch.randn(1, 16, LENGTH, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    ]
    gradient = torch.randn_like(tensors[0])
    mask = block_causal_mask(LENGTH, len(DOCUMENTS), device)

    def run(**options) -> None:
        torch.autograd.grad(F.scaled_dot_product_attention(*tensors, **options), tensors, gradient)

    print(f"causal, no mask   {milliseconds(lambda: run(is_causal=True)):.2f} ms")
    print(f"2-D boolean mask  {milliseconds(lambda: run(attn_mask=mask)):.2f} ms")
    print(f"4-D boolean mask  {milliseconds(lambda: run(attn_mask=mask[None, None])):.2f} ms")


if __name__ == "__main__":
    main()
