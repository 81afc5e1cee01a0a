"""Building the FLOP engine leaves the training run's state alone: random generators, real tensors,
user hooks and memory."""

from __future__ import annotations

import random

import numpy
import torch
from torch import nn

from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.flops.replica import build_replica


class StochasticDepthNet(nn.Module):
    """Draws from every global generator in its forward, like stochastic depth or layerdrop does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 32)

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            skip = torch.rand(()) < 0.1  # torch's CPU generator (read on the host by real code)
            skip = bool(random.random() < 0.1) or bool(numpy.random.rand() < 0.1) or skip.numel() == 0
            hidden = hidden if skip else hidden + layer(hidden)
        return self.head(hidden).float().sum()


def _batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 32, (2, 6))}


def test_every_global_generator_is_left_as_it_was():
    model = StochasticDepthNet()
    batch = _batch()
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    expected = (torch.rand(4), random.random(), numpy.random.rand())
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    FlopEngine.from_model(model, batch)
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert numpy.random.rand() == expected[2]


def test_probes_see_meta_tensors_only_and_never_touch_real_ones():
    seen: list[str] = []

    def forward(model: nn.Module, batch: dict) -> torch.Tensor:
        for tensor in (batch["inputs"]["input_ids"], batch["extra"][0], batch["extra"][1]["scale"]):
            seen.append(tensor.device.type)
        batch["extra"][0].add_(1)  # a forward that writes into its batch
        batch["extra"][1]["scale"].mul_(2)
        return model(batch["inputs"]["input_ids"])

    model = StochasticDepthNet()
    real = {"inputs": _batch(), "extra": [torch.zeros(2, 6), {"scale": torch.ones(2)}]}
    FlopEngine.from_model(model, real, forward=forward, token_counter=lambda batch: batch["inputs"])
    assert seen and set(seen) == {"meta"}
    assert torch.equal(real["extra"][0], torch.zeros(2, 6))
    assert torch.equal(real["extra"][1]["scale"], torch.ones(2))


def test_user_hooks_do_not_run_on_the_copy():
    calls: list[str] = []
    model = StochasticDepthNet()
    model.layers[0].register_forward_hook(lambda module, args, output: calls.append("hook"))
    model.register_forward_pre_hook(lambda module, args: calls.append("pre-hook"))
    FlopEngine.from_model(model, _batch())
    assert calls == []
    model(**_batch())
    assert calls == ["pre-hook", "hook"], "the user's model keeps its hooks"


def test_tensors_held_as_plain_attributes_are_not_copied():
    model = StochasticDepthNet()
    model.cache = torch.zeros(1024, 1024)  # neither a parameter nor a buffer
    model.layers[1].table = [torch.ones(256, 256)]
    replica = build_replica(model).module
    assert replica.cache.device.type == "meta" and replica.cache.shape == (1024, 1024)
    assert replica.layers[1].table[0].device.type == "meta"
