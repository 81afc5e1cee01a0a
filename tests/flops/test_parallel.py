"""Per-rank FLOPs under FSDP1, FSDP2, tensor parallel, a 2-D mesh and DeepSpeed ZeRO-3, in real gloo
groups of CPU processes.

The meter sums every rank's FLOPs, so each rank must count the matmuls it runs itself. The truth
of a rank is torch's FLOP formulas (``flop_registry``, what ``FlopCounterMode`` applies) around
that rank's real forward and backward, at two sequence lengths:

- FSDP (1 and 2) and ZeRO-3 gather whole weights: ``FlopCounterMode`` counts the rank's ops as they run.
- Tensor parallel runs each sharded matmul as a DTensor op, under which DTensor dispatches the local
  op. ``FlopCounterMode`` counts the DTensor op at its global shapes (and the attention, which runs
  on local heads, at local ones): not what the rank ran. ``LocalFlopCounter`` lets DTensor ops
  through (it answers NotImplemented for them), counts the local ops they come back with, and skips
  the fake-tensor ops DTensor runs to propagate shardings. It equals ``FlopCounterMode`` on a plain
  model built with one rank's share of the heads and MLP width, and wherever no DTensor op runs.

The ranks' sum of model FLOPs is checked against ``FlopCounterMode`` on an unsharded model running
the global batch (each data-parallel group's batch once) in one process; their sum of hardware
FLOPs adds the work tensor-parallel ranks genuinely repeat: a replicated LM head runs whole on each
of them, tp - 1 extra times per batch.

One launch of four processes and one of two serve every multiprocess test (the two-process one
also runs ZeRO-3 where DeepSpeed is installed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from mfu_callbacks._torch_internals import TorchDispatchMode
from mfu_callbacks.flops import FlopEngine, ModelIntrospectionError, is_sharded, observe_step, token_counting
from mfu_callbacks.flops.sharding import local_shape
from mfu_callbacks.parallelism import detect
from mfu_callbacks.testing import causal_lm, reference_step_flops
from tests.conftest import gloo_reports

LENGTHS = (16, 24)
ROWS = 2
VOCAB = 128
# Eight query and four key/value heads of 8 dimensions, MLP 128 wide: every tensor-parallel degree
# used here (2, 4) splits heads, key/value heads, MLP and vocabulary evenly.
MODEL = dict(hidden=64, layers=2, heads=8, kv_heads=4, vocab=VOCAB, attention="eager")
LORA_RANK = 4
TOLERANCE = 0.01

# The layouts each launch runs (``_layouts``), by world size.
FOUR = (
    "fsdp1_orig_params",
    "fsdp1_flat_params",
    "fsdp1_lora",
    "fsdp2",
    "fsdp2_lora",
    "tp",
    "tp_sequence_parallel",
    "fsdp2_x_tp",
    "fsdp2_x_tp_sequence_parallel",
)
TWO = ("tp", "tp_sequence_parallel", "zero3")
# Plans that leave the LM head whole on every tensor-parallel rank (the sequence-parallel ones shard it).
REPLICATED_HEAD = ("tp", "fsdp2_x_tp")
WITHOUT_DTENSOR_OPS = ("fsdp1_orig_params", "fsdp1_flat_params", "fsdp1_lora", "fsdp2", "fsdp2_lora", "zero3")
WITH_FLOP_COUNTER_MODE = (*WITHOUT_DTENSOR_OPS, "tp")
# FSDP1 (use_orig_params=True) flattens a unit's frozen weights with its trainable adapters: their
# views require a gradient, so their weight gradients run. Hardware FLOPs, not model FLOPs.
FROZEN_WEIGHT_GRADIENTS = ("fsdp1_lora",)
CASES = [pytest.param(4, name, id=f"4-{name}") for name in FOUR] + [
    pytest.param(2, name, id=f"2-{name}") for name in TWO
]


class LocalFlopCounter(TorchDispatchMode):
    """FLOPs of the ops a rank runs: DTensor ops pass through to DTensor's dispatch, whose local ops
    come back to this mode and are counted with FlopCounterMode's formulas."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(cls.__name__ == "DTensor" for cls in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry and not _not_run(out):
            self.total += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def _not_run(out: Any) -> bool:
    """DTensor propagates shardings by running an op on fake tensors, once per new shape: not work
    that ran."""
    first = out[0] if isinstance(out, (tuple, list)) else out
    return isinstance(first, torch.Tensor) and (
        first.device.type == "meta" or type(first).__name__ == "FakeTensor"
    )


def _batch(length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (ROWS, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _step(
    model: nn.Module, batch: dict[str, torch.Tensor], mode: TorchDispatchMode | FlopCounterMode
) -> None:
    deepspeed = type(model).__name__ == "DeepSpeedEngine"  # its engine runs the backward itself
    with mode:
        loss = model(**batch).loss
        model.backward(loss) if deepspeed else loss.backward()
    model.zero_grad() if deepspeed else model.zero_grad(set_to_none=True)


def _measure(model: nn.Module, data_rank: int, flop_counter_mode: bool) -> dict[str, list[int]]:
    """The copy's count (one engine, both lengths) and the rank's real steps under the rank counter,
    and under FlopCounterMode too if asked."""
    batches = [_batch(length, seed=100 * data_rank + length) for length in LENGTHS]
    engine = FlopEngine.from_model(model, batches[0])
    result: dict[str, list[int]] = {"engine": [], "hardware": [], "local": [], "flop_counter_mode": []}
    for batch in batches:
        estimate = engine.estimate(batch)
        result["engine"].append(estimate.model_flops)
        result["hardware"].append(estimate.hardware_flops)
        local = LocalFlopCounter()
        _step(model, batch, local)
        result["local"].append(local.total)
        if flop_counter_mode:
            counter = FlopCounterMode(display=False)
            _step(model, batch, counter)
            result["flop_counter_mode"].append(counter.get_total_flops())
    return result


# -- the parallel layouts -------------------------------------------------------------------------
def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers


def _tensor_parallel_plan(layers: int, sequence_parallel: bool) -> dict[str, Any]:
    """Megatron's layout on every projection; with sequence parallel (torchtitan's plan), the norms and
    the residual stream are sharded by sequence and the embedding and LM head are sharded too."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    stream = Shard(1) if sequence_parallel else None
    column = ColwiseParallel(input_layouts=stream) if stream else ColwiseParallel()
    row = RowwiseParallel(output_layouts=stream, use_local_output=False) if stream else RowwiseParallel()
    plan: dict[str, Any] = {}
    for index in range(layers):
        prefix = f"model.layers.{index}."
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[prefix + name] = column
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[prefix + name] = row
        if sequence_parallel:
            plan[prefix + "input_layernorm"] = SequenceParallel()
            plan[prefix + "post_attention_layernorm"] = SequenceParallel()
    if sequence_parallel:
        plan["model.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
        plan["model.norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    return plan


def _fsdp1(model: nn.Module, use_orig_params: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FullyShardedDataParallel(
        model,
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        device_id=torch.device("cpu"),
    )


def _fsdp2(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _zero3(model: nn.Module) -> nn.Module:
    """DeepSpeed ZeRO-3 on the CPU accelerator with gloo: parameters keep empty data and ``ds_shape``."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": ROWS,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, dist_init_required=False
    )
    return engine


def _layouts(world_size: int) -> dict[str, tuple[int, Any]]:
    """Name -> (tensor-parallel degree, a function building the layout on this rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    def tensor_parallel(model: nn.Module, mesh: Any, sequence_parallel: bool) -> nn.Module:
        return parallelize_module(model, mesh, _tensor_parallel_plan(MODEL["layers"], sequence_parallel))

    flat = lambda: init_device_mesh("cpu", (world_size,))  # noqa: E731
    layouts: dict[str, tuple[int, Any]] = {
        "tp": (world_size, lambda: tensor_parallel(causal_lm(**MODEL), flat(), False)),
        "tp_sequence_parallel": (world_size, lambda: tensor_parallel(causal_lm(**MODEL), flat(), True)),
    }
    if world_size == 2 and _has_deepspeed():
        layouts["zero3"] = (1, lambda: _zero3(causal_lm(**MODEL)))
    if world_size == 4:

        def two_dimensional(sequence_parallel: bool) -> nn.Module:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            return _fsdp2(tensor_parallel(causal_lm(**MODEL), mesh["tp"], sequence_parallel), mesh["dp"])

        layouts |= {
            "fsdp1_orig_params": (1, lambda: _fsdp1(causal_lm(**MODEL), use_orig_params=True)),
            "fsdp1_flat_params": (1, lambda: _fsdp1(causal_lm(**MODEL), use_orig_params=False)),
            "fsdp1_lora": (
                1,
                lambda: _fsdp1(causal_lm(**MODEL, lora_rank=LORA_RANK), use_orig_params=True),
            ),
            "fsdp2": (1, lambda: _fsdp2(causal_lm(**MODEL), flat())),
            "fsdp2_lora": (1, lambda: _fsdp2(causal_lm(**MODEL, lora_rank=LORA_RANK), flat())),
            "fsdp2_x_tp": (2, lambda: two_dimensional(False)),
            "fsdp2_x_tp_sequence_parallel": (2, lambda: two_dimensional(True)),
        }
    return layouts


def _observable(model: nn.Module) -> str:
    """Whether the real step of this layout can be watched, or why not."""
    try:
        observe_step(model, _batch(LENGTHS[0], seed=0), token_counting(model))  # never entered: adds no hooks
    except ModelIntrospectionError as error:
        return str(error)
    return "yes"


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    report: dict[str, Any] = {}
    try:
        for name, (tp, build) in _layouts(world_size).items():
            started = time.monotonic()
            try:
                model = build()
                layout = detect(model)
                measured = _measure(model, rank // tp, name in WITH_FLOP_COUNTER_MODE)
                report[name] = {"tp": tp, "data_rank": rank // tp, **measured}
                report[name]["parallelism"] = [layout.tensor_parallel, layout.data_parallel, layout.sharding]
                report[name]["sharded"] = is_sharded(model)
                report[name]["observable"] = _observable(model)
                report[name]["seconds"] = time.monotonic() - started
            except Exception as error:  # noqa: BLE001 - one layout's failure is that layout's test's failure
                report[name] = {"error": f"{type(error).__name__}: {error}"}
            dist.barrier()
        if rank == 0:
            started = time.monotonic()
            report["global"] = _global_truth(world_size, {tp for tp, _ in _layouts(world_size).values()})
            report["global"]["seconds"] = time.monotonic() - started
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _global_truth(world_size: int, degrees: set[int]) -> dict[str, Any]:
    """FlopCounterMode in one process, on plain models: unsharded copies over each data-parallel
    degree's global batch (the whole step, and the LM head's share of it: the work a replicated head
    repeats), and a model of one tensor-parallel rank's share (its heads and MLP width, the whole head)
    on the first data-parallel group's batch."""
    truth: dict[str, Any] = {}
    for lora in (False, True):
        model = causal_lm(**MODEL, lora_rank=LORA_RANK if lora else None)
        for tp in sorted(degrees) if not lora else [1]:
            totals, heads = [], []
            for length in LENGTHS:
                batches = [
                    _batch(length, seed=100 * data_rank + length) for data_rank in range(world_size // tp)
                ]
                merged = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
                counter = FlopCounterMode(display=False)
                _step(model, merged, counter)
                totals.append(counter.get_total_flops())
                heads.append(
                    sum(
                        sum(ops.values())
                        for key, ops in counter.get_flop_counts().items()
                        if key.endswith(".lm_head")
                    )
                )
            truth[f"{'lora' if lora else 'full'}_dp{world_size // tp}"] = {"total": totals, "head": heads}
    for tp in sorted(degrees - {1}):
        shard = _rank_share_model(tp)
        counts = []
        for length in LENGTHS:
            counter = FlopCounterMode(display=False)
            _step(shard, _batch(length, seed=length), counter)
            counts.append(counter.get_total_flops())
        truth[f"share_tp{tp}"] = counts
    return truth


def _rank_share_model(tp: int) -> nn.Module:
    """A plain Llama with one tensor-parallel rank's share of the heads and of the MLP width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, hidden = MODEL["heads"], MODEL["hidden"]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=heads // tp,
        num_key_value_heads=MODEL["kv_heads"] // tp,
        head_dim=hidden // heads,
        intermediate_size=2 * hidden // tp,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def _launch(folder: Path, world_sizes: tuple[int, ...]) -> dict[int, list[dict[str, Any]]]:
    """Start a gloo group of each size at once (they overlap their start-up), then read every rank's report."""
    groups = []
    for size in world_sizes:
        (folder / str(size)).mkdir()
        groups.append(
            (size, (size, str(folder / str(size) / "init"), str(folder / str(size))), folder / str(size))
        )
    return dict(zip(world_sizes, gloo_reports(_rank_main, groups, 300)))


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, list[dict[str, Any]]]:
    """World size -> every rank's report."""
    return _launch(tmp_path_factory.mktemp("gloo"), (4, 2))


@pytest.fixture(scope="module")
def four(reports) -> list[dict[str, Any]]:
    return reports[4]


@pytest.fixture(scope="module")
def two(reports) -> list[dict[str, Any]]:
    return reports[2]


def _ranks(reports: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    if name == "zero3" and not _has_deepspeed():
        pytest.skip("DeepSpeed is not installed (pip install deepspeed: it runs ZeRO-3 on CPU with gloo)")
    ranks = [report[name] for report in reports]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
    return ranks


def _close(ours: float, truth: float) -> bool:
    return abs(ours / truth - 1) <= TOLERANCE


def _global(reports: list[dict[str, Any]], name: str, world_size: int, tp: int) -> dict[str, list[int]]:
    return reports[0]["global"][f"{'lora' if 'lora' in name else 'full'}_dp{world_size // tp}"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("world_size", "name"), CASES)
def test_every_rank_counts_the_flops_it_ran(reports, world_size, name):
    """Each rank's hardware count against the ops it ran (at two lengths); its model count too, where
    the model needs every gradient that runs, less the work a replicated LM head repeats: of a head
    that every rank of a tensor-parallel group runs whole, each counts its 1/tp share."""
    ranks = _ranks(reports[world_size], name)
    tp = ranks[0]["tp"]
    head = _global(reports[world_size], name, world_size, tp)["head"]
    for rank, result in enumerate(ranks):
        for index, length in enumerate(LENGTHS):
            ran = result["local"][index]
            assert _close(result["hardware"][index], ran), (rank, length, result)
            if name in FROZEN_WEIGHT_GRADIENTS:
                continue
            repeated = (tp - 1) / tp * head[index] / (world_size // tp) if name in REPLICATED_HEAD else 0
            assert _close(result["engine"][index], ran - repeated), (rank, length, result)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("world_size", "name"), CASES)
def test_the_ranks_model_flops_sum_to_the_global_batch_and_their_hardware_flops_add_the_repeated_work(
    reports, world_size, name
):
    ranks = _ranks(reports[world_size], name)
    tp = ranks[0]["tp"]
    truth = _global(reports[world_size], name, world_size, tp)
    for index, length in enumerate(LENGTHS):
        assert _close(sum(r["engine"][index] for r in ranks), truth["total"][index]), (length, truth)
        if name in FROZEN_WEIGHT_GRADIENTS:
            continue
        repeated = (tp - 1) * truth["head"][index] if name in REPLICATED_HEAD else 0
        assert _close(sum(r["hardware"][index] for r in ranks), truth["total"][index] + repeated), (
            length,
            truth,
        )


@pytest.mark.multiprocess
def test_frozen_weights_flattened_with_adapters_cost_hardware_flops_only(four):
    """FSDP1 + LoRA: the weight gradients of frozen weights run (hardware), the model needs none: the
    model count is the unsharded LoRA model's on the rank's batch."""
    ranks = _ranks(four, "fsdp1_lora")
    per_rank = [total / len(ranks) for total in _global(four, "fsdp1_lora", 4, 1)["total"]]
    for result in ranks:
        assert all(_close(ours, truth) for ours, truth in zip(result["engine"], per_rank))
        assert all(hardware > 1.3 * model for hardware, model in zip(result["hardware"], result["engine"]))


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", WITHOUT_DTENSOR_OPS)
def test_the_rank_counter_is_flop_counter_mode_where_no_dtensor_op_runs(four, two, name):
    for result in _ranks(two if name == "zero3" else four, name):
        assert result["local"] == result["flop_counter_mode"]


@pytest.mark.multiprocess
def test_under_tensor_parallel_flop_counter_mode_counts_global_shapes_and_the_rank_counter_its_share(
    four, two
):
    """FlopCounterMode sees each DTensor matmul whole; the rank counter sees what a plain model of
    one rank's share (its heads, its MLP width, the whole LM head) runs, exactly."""
    for reports, tp in ((four, 4), (two, 2)):
        for result in _ranks(reports, "tp"):
            assert result["local"] == reports[0]["global"][f"share_tp{tp}"]
            assert all(
                whole > 1.5 * local for whole, local in zip(result["flop_counter_mode"], result["local"])
            )


SHARDING = {"fsdp1": "fsdp1", "fsdp2": "fsdp2", "zero3": "zero3"}


@pytest.mark.multiprocess
@pytest.mark.parametrize(("world_size", "name"), CASES)
def test_the_layout_is_read_from_the_model(reports, world_size, name):
    sharding = next((value for prefix, value in SHARDING.items() if name.startswith(prefix)), None)
    for result in _ranks(reports[world_size], name):
        tp = result["tp"]
        assert result["parallelism"] == [tp, world_size // tp, sharding]
        assert result["sharded"]  # so the recorder counts from the copy, and does not watch the step
        if tp > 1:  # nor can it be asked to (real_step="only"): it would count global shapes
            assert "not this rank's share" in result["observable"]
        else:
            assert result["observable"] == "yes"


def test_a_plain_model_has_no_parallel_layout():
    layout = detect(causal_lm(**MODEL))
    assert (layout.world_size, layout.tensor_parallel, layout.data_parallel, layout.sharding) == (
        1,
        1,
        1,
        None,
    )


# -- in one process ---------------------------------------------------------------------------------
def test_zero3_parameters_with_empty_data_count_at_their_full_shape():
    """ZeRO-3 partitions each parameter into empty data, its shape kept in ``ds_shape``."""
    model, reference = causal_lm(**MODEL), causal_lm(**MODEL)
    for index, parameter in enumerate(model.parameters()):
        parameter.ds_shape, parameter.ds_id = parameter.shape, index
        parameter.data = torch.empty(0, dtype=parameter.dtype)
    engine = FlopEngine.from_model(model, _batch(LENGTHS[0], seed=0))
    for length in LENGTHS:
        batch = _batch(length, seed=length)
        assert engine.estimate(batch).model_flops == reference_step_flops(reference, batch)


class _MemoryEfficientLinear(torch.autograd.Function):
    """What DeepSpeed ZeRO-3 puts in place of ``F.linear``: the same matmuls in a custom Function."""

    @staticmethod
    def forward(ctx, input, weight, bias=None):
        ctx.save_for_backward(input, weight)
        output = input.matmul(weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_output.flatten(0, -2).t().matmul(input.flatten(0, -2))
        grad_bias = grad_output.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias


def _deepspeed_linear(input, weight, bias=None):
    return _MemoryEfficientLinear.apply(input, weight, bias)


_deepspeed_linear.__module__ = "deepspeed.runtime.zero.linear"


@pytest.mark.parametrize("lora", [False, True])
def test_a_linear_deepspeed_replaced_with_a_custom_function_counts_its_backward(monkeypatch, lora):
    model = causal_lm(**MODEL, lora_rank=LORA_RANK if lora else None)
    batches = [_batch(length, seed=length) for length in LENGTHS]
    truths = [reference_step_flops(model, batch) for batch in batches]
    monkeypatch.setattr(torch.nn.functional, "linear", _deepspeed_linear)
    assert [reference_step_flops(model, batch) for batch in batches] == truths  # the same matmuls run
    engine = FlopEngine.from_model(model, batches[0])
    assert [engine.estimate(batch).model_flops for batch in batches] == truths
    assert torch.nn.functional.linear is _deepspeed_linear  # put back after the trace


class _Mesh:
    """The two things ``local_shape`` asks of a DeviceMesh."""

    def __init__(self, sizes: tuple[int, ...], coordinate: list[int] | None) -> None:
        self.sizes, self.coordinate = sizes, coordinate

    def get_coordinate(self) -> list[int] | None:
        return self.coordinate

    def size(self, dim: int) -> int:
        return self.sizes[dim]


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("size", [5, 7, 8])
def test_a_shard_is_the_chunk_torch_chunk_gives_the_rank(ranks, size):
    from torch.distributed.tensor import Replicate, Shard

    chunks = torch.arange(size).chunk(ranks)
    for rank in range(ranks):
        expected = chunks[rank].numel() if rank < len(chunks) else 0
        shape = local_shape(torch.Size([size, 6]), _Mesh((2, ranks), [1, rank]), (Replicate(), Shard(0)))
        assert shape == torch.Size([expected, 6])
    assert local_shape(torch.Size([size, 6]), _Mesh((ranks,), None), (Shard(1),)) == torch.Size([0, 0])
