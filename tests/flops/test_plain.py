"""Plain PyTorch models and the wrappers training frameworks put around a model.

A home-made GPT on ``nn.MultiheadAttention`` with its own projection head and a small CNN take a
tensor, not keyword arguments, so they reach the engine through ``forward=``. Wrapped models
(torch.compile, DDP, FSDP2, Accelerate) must give exactly the FLOPs of the bare model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from peft import LoraConfig, get_peft_model
from torch import nn

from mfu_callbacks.flops import FlopEngine
from tests.conftest import LENGTHS, VOCAB, check_engine, full_batch, padded_batch


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=causal, key_padding_mask=padding, need_weights=True)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A GPT written by hand: token and position embeddings, MHA blocks, a projection head of its own."""

    def __init__(self, width: int = 32, heads: int = 4, layers: int = 3, checkpointing: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(64, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.projection = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, VOCAB)
        )
        self.gradient_checkpointing = checkpointing

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        padding = None if mask is None else mask == 0
        for block in self.blocks:
            if self.gradient_checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, padding, use_reentrant=False)
            else:
                x = block(x, padding)
        return self.projection(x)


def gpt_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], batch.get("attention_mask"))


def gpt(**options: Any) -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(**options).train()


def text_batches(rows: int = 2) -> list[dict[str, torch.Tensor]]:
    return [full_batch(rows, length, labels=False) for length in LENGTHS]


def test_gpt_full_fine_tuning() -> None:
    check_engine(gpt(), full_batch(2, 9, labels=False), text_batches(), forward=gpt_forward)


def test_gpt_lora() -> None:
    model = get_peft_model(
        gpt(), LoraConfig(r=4, target_modules=["out_proj", "mlp.0", "mlp.2", "projection.3"])
    )
    check_engine(model, full_batch(2, 9, labels=False), text_batches(3), forward=gpt_forward)


def test_gpt_gradient_checkpointing() -> None:
    check_engine(gpt(checkpointing=True), full_batch(2, 9, labels=False), text_batches(), forward=gpt_forward)


def test_gpt_padded_batch() -> None:
    batches = [padded_batch([length, length - 3, 2], labels=False) for length in LENGTHS]
    check_engine(gpt(), padded_batch([9, 4], labels=False), batches, forward=gpt_forward)


class AuxiliaryOutput(nn.Module):
    """Returns its loss beside an output that never reaches it (like a VLM's image hidden states)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)
        self.probe = nn.Linear(width, 4 * width)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        hidden = self.body(self.embedding(input_ids))
        logits = self.head(hidden)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits, "probe": self.probe(hidden)}


@pytest.mark.parametrize("form", ["mapping", "attribute"])
def test_outputs_that_never_reach_the_loss_get_no_backward(form: str) -> None:
    """The backward starts at the loss alone, whether the forward returns it in a mapping or as ``.loss``."""

    def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        outputs = model(**batch)
        return outputs if form == "mapping" else SimpleNamespace(**outputs)

    torch.manual_seed(0)
    batches = [full_batch(rows, length) for rows in (1, 2) for length in LENGTHS]
    check_engine(AuxiliaryOutput(), full_batch(3, 9), batches, forward=forward)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().train()


def image_batch(rows: int, size: int = 8) -> dict[str, torch.Tensor]:
    images = torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(rows))
    return {"pixel_values": images, "labels": torch.arange(rows) % 10}


def cnn_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])


def test_cnn_full_fine_tuning() -> None:
    """Images and labels: FLOPs scale with the image rows."""
    check_engine(cnn(), image_batch(2), [image_batch(1), image_batch(3)], forward=cnn_forward)


def test_cnn_frozen_first_conv() -> None:
    """No input gradient for the first convolution (its input is the data), and no weight gradient where frozen."""
    model = cnn()
    model.features[0].requires_grad_(False)
    check_engine(model, image_batch(2), [image_batch(1), image_batch(3)], forward=cnn_forward)


# -- wrappers ----------------------------------------------------------------------------------------
def same_flops(wrapped: nn.Module, bare: nn.Module, forward: Any = gpt_forward) -> None:
    """The engine sees through the wrapper: the same model and hardware FLOPs as for the bare model."""
    for batch in [padded_batch([length, 3], labels=False) for length in LENGTHS]:
        expected = FlopEngine.from_model(bare, batch, forward=forward).estimate(batch)
        actual = FlopEngine.from_model(wrapped, batch, forward=forward).estimate(batch)
        assert actual == expected


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_torch_compile() -> None:
    bare = gpt()
    compiled = torch.compile(bare)
    assert type(compiled).__name__ == "OptimizedModule"
    same_flops(compiled, bare)


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group on the CPU."""
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_ddp(process_group: None) -> None:
    bare = gpt()
    same_flops(nn.parallel.DistributedDataParallel(bare), bare)


def test_fsdp2(process_group: None) -> None:
    """``fully_shard`` shards in place: parameters become DTensors of the full logical shape."""
    from torch.distributed.fsdp import fully_shard

    model = gpt()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    same_flops(model, gpt())


def test_accelerate_prepared_model() -> None:
    from accelerate import Accelerator

    bare = gpt()
    prepared = Accelerator(cpu=True).prepare_model(gpt())
    same_flops(prepared, bare)
