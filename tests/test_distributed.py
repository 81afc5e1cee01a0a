"""The log-time reduction, in a real two-process gloo group on CPU, with one rank slower on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn

from mfu_callbacks import distributed
from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.timer import StepTimer
from tests.conftest import gloo_reports
from tests.helpers.fakes import FakeClock, FakeEngine, FakePeak, batch, run_step

WORLD_SIZE = 2
# Per rank: seconds per step, input wait before each step, real tokens per step.
STEP_SECONDS = (0.2, 0.3)
WAIT_SECONDS = (0.05, 0.0)
TOKENS = (100, 50)
STEPS, WARMUP = 3, 1


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        collectives = []
        all_reduce = dist.all_reduce

        def counted_all_reduce(tensor, *args, **kwargs):
            collectives.append(tensor.device.type)
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted_all_reduce
        report = {"world_size": distributed.world_size(), "rank": distributed.rank()}
        report["sum_and_max"] = distributed.sum_and_max_over_ranks(
            [rank + 1.0, 10.0], [float(rank), -float(rank)]
        )

        collectives.clear()
        clock = FakeClock()
        meter = MFUMeter(
            nn.Linear(2, 2),
            engine=FakeEngine(),
            peak=FakePeak(),
            timer=StepTimer(WARMUP, clock=clock, force_cpu=True),
        )
        for _ in range(STEPS):
            run_step(meter, clock, batch(TOKENS[rank]), seconds=STEP_SECONDS[rank], wait=WAIT_SECONDS[rank])
        report["collectives_during_steps"] = len(collectives)
        report["metrics"] = meter.metrics()
        report["collectives_per_read"] = list(collectives)
        report["summary"] = meter.summary()
        try:
            MFUMeter(nn.Linear(2, 2), engine=FakeEngine(), peak=FakePeak(), world_size=3).metrics()
            report["mismatch"] = "accepted"
        except ValueError as error:
            report["mismatch"] = str(error)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gloo")
    (reports,) = gloo_reports(_rank_main, [(WORLD_SIZE, (str(folder / "init"), str(folder)), folder)], 120)
    return reports


def test_helpers_without_a_process_group():
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1
    assert distributed.rank() == 0
    assert distributed.sum_and_max_over_ranks([1.0, 2.0], [3.0]) == ([1.0, 2.0], [3.0])


@pytest.mark.multiprocess
def test_ranks_and_the_raw_reduction(reports):
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)
    for report in reports:
        assert report["sum_and_max"] == [[3.0, 20.0], [1.0, 0.0]]


@pytest.mark.multiprocess
def test_flops_and_tokens_are_summed_over_ranks_and_divided_by_both_gpus(reports):
    # Two measured steps per rank: rank 0 did 2 x 100 tokens in 2 x (0.2 + 0.05 wait) = 0.5 s,
    # rank 1 (slower) 2 x 50 in 0.6 s; the faster rank waits for the slower one.
    metrics = reports[0]["metrics"]
    model_flops = (2 * 100 + 2 * 50) * 1e9
    assert metrics["mfu"] == pytest.approx(model_flops / (0.6 * 2 * 1e12))
    assert metrics["hfu"] == pytest.approx(300 * 1.5e9 / (0.6 * 2 * 1e12))
    assert metrics["tflops_per_gpu"] == pytest.approx(model_flops / 0.6 / 2 / 1e12)
    assert metrics["tokens_per_sec"] == pytest.approx(300 / 0.6)
    assert metrics["tokens_per_sec_per_gpu"] == pytest.approx(300 / 0.6 / 2)
    assert metrics["step_time"] == pytest.approx(0.3)
    assert metrics["mfu_last_step"] == pytest.approx(150e9 / (0.3 * 2 * 1e12))
    # Waits: rank 0 waited 0.05 s before each of its 2 steps, rank 1 never; 0.1 s of 1.1 s in all.
    assert metrics["input_wait_fraction"] == pytest.approx(0.1 / 1.1)


@pytest.mark.multiprocess
def test_step_time_max_and_min_show_the_slower_rank(reports):
    for report in reports:
        assert report["metrics"]["step_time_max"] == pytest.approx(0.3)
        assert report["metrics"]["step_time_min"] == pytest.approx(0.2)  # the input wait is not step time


@pytest.mark.multiprocess
def test_every_rank_reports_the_same_numbers(reports):
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["summary"] == reports[1]["summary"]
    assert reports[0]["summary"]["mfu"] == pytest.approx(reports[0]["metrics"]["mfu"])


@pytest.mark.multiprocess
def test_no_collective_per_step_and_two_small_ones_per_read_on_the_cpu_for_gloo(reports):
    for report in reports:
        assert report["collectives_during_steps"] == 0
        assert report["collectives_per_read"] == ["cpu", "cpu"]


@pytest.mark.multiprocess
def test_a_world_size_that_contradicts_the_process_group_is_refused(reports):
    assert "the process group has 2 ranks" in reports[0]["mismatch"]
