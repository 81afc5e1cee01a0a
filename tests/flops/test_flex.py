"""flex_attention traced on the meta device: model FLOPs as SDPA counts the same sequences, hardware
FLOPs from the blocks of its BlockMask, each checked at two lengths against an independent count
(FlopCounterMode on eager attention, and on one block's tile times the blocks a dense mask touches)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.testing import causal_lm
from tests.conftest import LENGTHS, assert_flops, check_engine, full_batch, step_truth

HIDDEN, HEADS, VOCAB, BLOCK = 32, 2, 64, 16
FLEX_LENGTHS = (48, 80)  # 3 and 5 blocks of BLOCK: a causal mask visits 6 of 9 and 15 of 25


def causal(batch, head, q, kv):
    return q >= kv


def sliding_window(batch, head, q, kv):
    return (q >= kv) & (q - kv < BLOCK)


class FlexAttention(nn.Module):
    """Self-attention through flex_attention, its BlockMask built per call for the input's length and device;
    ``flex=False`` runs the same attention as explicit matmuls (what FlopCounterMode counts on the CPU)."""

    def __init__(self, mask_mod) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.mask_mod = mask_mod
        self.flex = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, length, _ = hidden.shape
        q, k, v = self.qkv(hidden).view(rows, length, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
        if self.flex:
            mask = None
            if self.mask_mod is not None:
                mask = create_block_mask(
                    self.mask_mod, None, None, length, length, device=hidden.device, BLOCK_SIZE=BLOCK
                )
            attended = flex_attention(q, k, v, block_mask=mask)
        else:
            attended = eager_attention(q, k, v, self.mask_mod)
        return self.out(attended.transpose(1, 2).reshape(rows, length, HIDDEN))


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod) -> torch.Tensor:
    positions_q = torch.arange(q.shape[-2])[:, None]
    positions_kv = torch.arange(k.shape[-2])[None, :]
    scores = q @ k.transpose(-1, -2)
    if mask_mod is not None:
        scores = scores.masked_fill(~mask_mod(None, None, positions_q, positions_kv), float("-inf"))
    return scores.softmax(-1) @ v


class FlexLM(nn.Module):
    def __init__(self, mask_mod=causal) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.attention = FlexAttention(mask_mod)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        return self.head(self.attention(self.embed(input_ids))).float().sum()


def batch(rows: int, length: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(length))
    }


def eager_truth(model: FlexLM, inputs: dict[str, torch.Tensor]) -> int:
    """The step with the attention as explicit matmuls over every query-key pair."""
    model.attention.flex = False
    try:
        return step_truth(model, inputs)
    finally:
        model.attention.flex = True


def attention_truth(rows: int, q_len: int, kv_len: int) -> int:
    """FlopCounterMode on scores and values of one (q_len x kv_len) attention, forward and backward."""
    head_dim = HIDDEN // HEADS
    q = torch.randn(rows, HEADS, q_len, head_dim, requires_grad=True)
    k = torch.randn(rows, HEADS, kv_len, head_dim, requires_grad=True)
    v = torch.randn(rows, HEADS, kv_len, head_dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
    return counter.get_total_flops()


def visited_blocks(mask_mod, length: int) -> int:
    """Blocks of BLOCK x BLOCK in which the dense mask allows any pair: what the kernel computes."""
    positions = torch.arange(length)
    dense = mask_mod(None, None, positions[:, None], positions[None, :])
    blocks = length // BLOCK
    return int(dense.view(blocks, BLOCK, blocks, BLOCK).any(3).any(1).sum())


@pytest.mark.parametrize("mask_mod", [causal, sliding_window, None], ids=["causal", "window", "no-mask"])
def test_flex_attention_counts_every_pair_for_model_flops_at_two_lengths(mask_mod):
    model = FlexLM(mask_mod)
    engine = FlopEngine.from_model(model, batch(2, FLEX_LENGTHS[0]))
    for rows, length in ((2, FLEX_LENGTHS[0]), (3, FLEX_LENGTHS[1])):
        inputs = batch(rows, length)
        assert_flops(
            engine.estimate(inputs).model_flops, eager_truth(model, inputs), f"model FLOPs at {length}"
        )


@pytest.mark.parametrize("mask_mod", [causal, sliding_window])
@pytest.mark.parametrize("length", FLEX_LENGTHS)
def test_flex_attention_hardware_flops_are_the_blocks_of_its_mask(mask_mod, length):
    model = FlexLM(mask_mod)
    rows = 2
    inputs = batch(rows, length)
    step = FlopEngine.from_model(model, inputs).estimate(inputs)
    dense = attention_truth(rows, length, length)
    blocks = visited_blocks(mask_mod, length) * attention_truth(rows, BLOCK, BLOCK)
    assert blocks < dense
    assert_flops(
        step.hardware_flops, eager_truth(model, inputs) - dense + blocks, f"hardware FLOPs at {length}"
    )


class DocumentFlexLM(FlexLM):
    """Attention within documents (separated by token 0): the mask reads the batch."""

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        documents = (input_ids[0] == 0).cumsum(0)
        self.attention.mask_mod = lambda batch, head, q, kv: documents[q] == documents[kv]
        return super().forward(input_ids)


def test_without_a_block_mask_every_block_is_computed():
    inputs = batch(2, FLEX_LENGTHS[0])
    step = FlopEngine.from_model(FlexLM(None), inputs).estimate(inputs)
    assert step.hardware_flops == step.model_flops > 0


def test_a_mask_that_reads_the_batch_counts_as_dense():
    """Its mask_mod cannot be evaluated at build (the probe's batch holds no values): hardware = model."""
    inputs = batch(2, FLEX_LENGTHS[0])
    step = FlopEngine.from_model(DocumentFlexLM(), inputs).estimate(inputs)
    assert step.hardware_flops == step.model_flops > 0


def test_a_transformers_model_with_flex_attention_counts_as_with_sdpa():
    model = causal_lm(
        hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=128, attention="flex_attention"
    )
    assert model.config._attn_implementation == "flex_attention"
    check_engine(model, full_batch(2, LENGTHS[0]), [full_batch(2, length) for length in LENGTHS])
