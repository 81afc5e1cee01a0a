"""The parallel layout read from the model, and what it changes in the metrics: tokens counted once
per tensor-parallel group, and the straggler view over data-parallel groups.

The real check runs four gloo processes on CPU (FSDP2 x TP needs two of each), on small torch
modules: DTensor parameters of FSDP2, of tensor parallelism and of both, an FSDP1 and a DDP wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mfu_callbacks import parallelism
from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.runs.summary import describe_setup
from mfu_callbacks.timer import StepTimer
from tests.conftest import gloo_reports
from tests.helpers.fakes import FakeClock, FakeEngine, FakePeak, batch, run_step

WORLD_SIZE = 4
# Per rank, on the mesh [[0, 1], [2, 3]] (dp_shard x tp): rank 0 is fastest, but it waits for rank 1
# inside every step; the data-parallel group of ranks 2 and 3 is the slower one.
STEP_SECONDS = (0.2, 0.25, 0.3, 0.3)
TOKENS = 100  # every rank of a TP group sees the same batch
STEPS = 3


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("tp", "tensor"),
        ("tensor_parallel", "tensor"),  # Lightning's ModelParallelStrategy
        ("data_parallel", "data"),
        ("dp_shard", "data"),  # Accelerate's ParallelismConfig, torchtitan
        ("dp_replicate", "data"),
        ("dp_shard_cp", "data"),  # torchtitan's flattened FSDP dimension
        ("cp", "context"),
        ("pp", "pipeline"),
        (None, "data"),  # unnamed: its tokens are never divided
        ("experts", "data"),
    ],
)
def test_the_role_of_a_mesh_dimension_comes_from_its_name(name, role):
    assert parallelism.role_of_dimension(name) == role


def test_a_model_without_a_process_group_is_one_plain_rank():
    layout = parallelism.detect(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert layout == parallelism.Parallelism()
    assert layout.as_config() == {
        "engine": "none",
        "data_parallel": 1,
        "fsdp_shard": 1,
        "dp_replicate": 1,
        "tensor_parallel": 1,
    }


def test_the_run_config_states_the_degrees():
    layout = parallelism.Parallelism(
        world_size=8,
        engine="fsdp2",
        data_parallel=4,
        tensor_parallel=2,
        fsdp_shard=4,
        mesh={"dp_shard": 4, "tp": 2},
        batch_group=(2, 3),
    )
    setup = describe_setup(world_size=8, parallelism=layout.as_config())
    assert setup["world_size"] == 8
    assert setup["parallelism"] == {
        "engine": "fsdp2",
        "data_parallel": 4,
        "fsdp_shard": 4,
        "dp_replicate": 1,
        "tensor_parallel": 2,
        "mesh": {"dp_shard": 4, "tp": 2},
    }
    assert layout.group_id == 2


class Block(nn.Module):
    """An MLP shaped for tensor parallelism: column-wise in, row-wise out."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _tensor_parallel(block: Block, mesh) -> Block:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(block, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def _layouts(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    torch.manual_seed(0)
    both = fully_shard(_tensor_parallel(Block(), mesh["tp"]), mesh=mesh["dp_shard"])
    layouts = {
        "fsdp2": fully_shard(Block(), mesh=init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))),
        "tp": _tensor_parallel(Block(), mesh["tp"]),
        "fsdp2_tp": both,
        "fsdp1": FullyShardedDataParallel(Block(), device_id=torch.device("cpu")),
        "ddp": DistributedDataParallel(Block()),
    }
    found = {name: parallelism.detect(model) for name, model in layouts.items()}
    report = {
        name: {**layout.as_config(), "batch_group": list(layout.batch_group)}
        for name, layout in found.items()
    }

    # The meter on the FSDP2 x TP model, with a fake engine and clock: what it logs.
    clock = FakeClock()
    meter = MFUMeter(
        both, engine=FakeEngine(), peak=FakePeak(), timer=StepTimer(0, clock=clock, force_cpu=True)
    )
    for _ in range(STEPS):
        run_step(meter, clock, batch(TOKENS), seconds=STEP_SECONDS[rank])
    report["metrics"] = meter.metrics()
    return report


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_layouts(rank)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("layouts")
    (reports,) = gloo_reports(_rank_main, [(WORLD_SIZE, (str(folder / "init"), str(folder)), folder)], 120)
    return reports


@pytest.mark.multiprocess
def test_fsdp2_shards_over_every_rank(reports):
    for rank, report in enumerate(reports):
        assert report["fsdp2"] == {
            "engine": "fsdp2",
            "data_parallel": 4,
            "fsdp_shard": 4,
            "dp_replicate": 1,
            "tensor_parallel": 1,
            "mesh": {"dp_shard": 4},
            "batch_group": [rank],
        }


@pytest.mark.multiprocess
def test_tensor_parallel_pairs_share_a_batch(reports):
    for rank, report in enumerate(reports):
        pair = [0, 1] if rank < 2 else [2, 3]
        assert report["tp"]["tensor_parallel"] == 2
        assert report["tp"]["data_parallel"] == 2
        assert report["tp"]["engine"] == "none"
        assert report["tp"]["batch_group"] == pair
        both = report["fsdp2_tp"]
        assert both["engine"] == "fsdp2"
        assert (both["data_parallel"], both["fsdp_shard"], both["tensor_parallel"]) == (2, 2, 2)
        assert both["mesh"] == {"dp_shard": 2, "tp": 2}
        assert both["batch_group"] == pair


@pytest.mark.multiprocess
def test_fsdp1_and_ddp_wrappers(reports):
    for report in reports:
        assert report["fsdp1"]["engine"] == "fsdp1"
        assert (report["fsdp1"]["fsdp_shard"], report["fsdp1"]["dp_replicate"]) == (4, 1)
        assert report["ddp"]["engine"] == "ddp"
        assert (report["ddp"]["fsdp_shard"], report["ddp"]["dp_replicate"]) == (1, 4)


@pytest.mark.multiprocess
def test_tokens_of_a_tensor_parallel_group_count_once(reports):
    # Two data-parallel groups, each 100 tokens per step; the slower group took 0.3 s per step.
    metrics = reports[0]["metrics"]
    wall = STEPS * 0.3
    assert metrics["tokens_per_sec"] == pytest.approx(2 * STEPS * TOKENS / wall)
    assert metrics["tokens_per_sec_per_gpu"] == pytest.approx(2 * STEPS * TOKENS / wall / WORLD_SIZE)
    assert all(report["metrics"] == metrics for report in reports)


@pytest.mark.multiprocess
def test_the_straggler_view_compares_data_parallel_groups(reports):
    # Rank 0 (0.2 s) waits for its TP partner rank 1 (0.25 s): its group's step is 0.25 s. The
    # other group's is 0.3 s. Comparing ranks would report 0.2 s, a rank that is not faster.
    metrics = reports[0]["metrics"]
    assert metrics["step_time_max"] == pytest.approx(0.3)
    assert metrics["step_time_min"] == pytest.approx(0.25)
