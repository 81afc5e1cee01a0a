"""The meta-device copy of the model never deep-copies a real tensor, wherever the tensor sits.

Each case holds tensors that ``copy.deepcopy`` cannot copy or should not: FSDP1's flat parameters
and the views it leaves in the modules, FSDP2's DTensors, parametrized weights, a non-leaf tensor
(deepcopy raises "Only Tensors created explicitly by the user (graph leaves) support the deepcopy
protocol"), tensors inside a dataclass and a plain object. While the engine is built, deep-copying
any tensor that is not on the meta device raises; the FLOPs must still be the truth's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrizations
from torch.profiler import ProfilerActivity, profile

from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.flops.meta_copy.replica import build_replica
from mfu_callbacks.testing import causal_lm
from tests.conftest import LENGTHS, VOCAB, assert_flops, full_batch, gloo_reports, model_truth, step_truth


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group on the CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def llama() -> nn.Module:
    """Two Llama layers with eager attention (the kernel the truth counts), grouped-query."""
    return causal_lm(hidden=32, layers=2, heads=4, kv_heads=2, vocab=VOCAB, attention="eager")


def _decoder_layer(model: nn.Module) -> type[nn.Module]:
    return type(model.model.layers[0])


def fsdp1(use_orig_params: bool) -> Callable[[nn.Module], nn.Module]:
    def wrap(model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({_decoder_layer(model)})
        return FullyShardedDataParallel(
            model, use_orig_params=use_orig_params, auto_wrap_policy=policy, device_id=torch.device("cpu")
        )

    return wrap


def fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def weight_norm(model: nn.Module) -> nn.Module:
    parametrizations.weight_norm(model.model.layers[0].mlp.down_proj)
    return model


def orthogonal(model: nn.Module) -> nn.Module:
    parametrizations.orthogonal(model.model.layers[1].self_attn.o_proj)
    return model


def non_leaf_attribute(model: nn.Module) -> nn.Module:
    model.model.layers[0].scaled = model.lm_head.weight * 2  # part of an autograd graph
    return model


@dataclass
class Cache:
    table: torch.Tensor
    rows: list[torch.Tensor]


class Holder:
    """An object of no container type, with tensors in its attributes."""

    def __init__(self, weight: nn.Parameter) -> None:
        self.view = weight[:4]
        self.nested = {"sum": weight.sum(-1)}


def objects_holding_tensors(model: nn.Module) -> nn.Module:
    model.model.cache = Cache(torch.zeros(8, 8), [torch.ones(3) + 0])
    model.model.layers[1].holder = Holder(model.model.embed_tokens.weight)
    return model


# case -> (how the model is changed, whether the truth runs on the changed model rather than a bare one)
CASES = {
    "fsdp1": (fsdp1(use_orig_params=True), False),
    "fsdp1-flat-parameters": (fsdp1(use_orig_params=False), False),
    "fsdp2": (fsdp2, False),
    "weight-norm": (weight_norm, True),
    "orthogonal": (orthogonal, True),
    "non-leaf-attribute": (non_leaf_attribute, True),
    "objects-holding-tensors": (objects_holding_tensors, True),
}
DISTRIBUTED = {"fsdp1", "fsdp1-flat-parameters", "fsdp2"}


def _tensor_classes(cls: type = torch.Tensor) -> Iterator[type]:
    yield cls
    for subclass in cls.__subclasses__():
        yield from _tensor_classes(subclass)


def refuse_real_deepcopy(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, deep-copying a tensor that is not on the meta device raises (every tensor class
    with a ``__deepcopy__`` of its own: Tensor, Parameter, ...; DTensor and FlatParameter inherit one)."""
    for cls in {c for c in _tensor_classes() if "__deepcopy__" in vars(c)}:
        original = cls.__deepcopy__

        def guarded(self: torch.Tensor, memo: dict, original: Callable = original) -> torch.Tensor:
            if self.device.type != "meta":
                raise AssertionError(f"a real {type(self).__name__} {tuple(self.shape)} was deep-copied")
            return original(self, memo)

        monkeypatch.setattr(cls, "__deepcopy__", guarded)


@pytest.mark.parametrize("case", list(CASES))
def test_no_real_tensor_is_deep_copied_and_the_flops_are_the_truths(
    case: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case in DISTRIBUTED:
        request.getfixturevalue("process_group")
    change, truth_on_changed = CASES[case]
    model = change(llama())
    truth_model = model if truth_on_changed else llama()
    with monkeypatch.context() as patch:
        refuse_real_deepcopy(patch)
        engine = FlopEngine.from_model(model, full_batch(2, 8))
    for length in LENGTHS:
        batch = full_batch(2, length)
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(truth_model, batch), f"{case}, model FLOPs, T={length}")
        assert_flops(
            step.hardware_flops, step_truth(truth_model, batch), f"{case}, hardware FLOPs, T={length}"
        )


# -- sharded over two ranks -------------------------------------------------------------------------
SHARDED = ("fsdp1", "fsdp1-flat-parameters", "fsdp2")
WORLD_SIZE = 2


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank holds half of every parameter; the engine must still count the whole model."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    patch = pytest.MonkeyPatch()
    try:
        refuse_real_deepcopy(patch)
        report = {}
        for case in SHARDED:
            engine = FlopEngine.from_model(CASES[case][0](llama()), full_batch(2, 8))
            steps = [engine.estimate(full_batch(2, length)) for length in LENGTHS]
            report[case] = [[step.model_flops, step.hardware_flops] for step in steps]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        patch.undo()
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_parameters_sharded_over_two_ranks_count_whole(tmp_path: Path) -> None:
    (reports,) = gloo_reports(
        _rank_main, [(WORLD_SIZE, (str(tmp_path / "init"), str(tmp_path)), tmp_path)], 180
    )
    bare = llama()
    for index, length in enumerate(LENGTHS):
        batch = full_batch(2, length)
        truth = (model_truth(bare, batch), step_truth(bare, batch))
        for report in reports:
            for case in SHARDED:
                model_flops, hardware_flops = report[case][index]
                assert_flops(model_flops, truth[0], f"{case} sharded, model FLOPs, T={length}")
                assert_flops(hardware_flops, truth[1], f"{case} sharded, hardware FLOPs, T={length}")


def test_the_guard_catches_a_real_tensor_deep_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard is live: a real tensor that reached copy.deepcopy would fail the tests above."""
    refuse_real_deepcopy(monkeypatch)
    with pytest.raises(AssertionError, match="was deep-copied"):
        copy.deepcopy(Cache(torch.zeros(2), []))


def test_a_large_tensor_inside_a_dataclass_allocates_nothing() -> None:
    """A 256 MiB tensor in a dataclass attribute becomes a meta tensor: building the copy allocates
    no CPU memory for it (a deep copy of the tensor would allocate 256 MiB)."""
    model = llama()
    model.model.cache = Cache(torch.empty(64, 1024, 1024), [])  # 256 MiB of float32
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        replica = build_replica(model).module
    allocated = sum(max(event.cpu_memory_usage, 0) for event in profiler.events())
    assert replica.model.cache.table.device.type == "meta"
    assert replica.model.cache.table.shape == (64, 1024, 1024)
    assert allocated < 1 << 20, f"building the copy allocated {allocated / 2**20:.1f} MiB"
