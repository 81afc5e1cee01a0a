"""The Accelerate integration: a hand-written loop, a real tracker, and a 2-process launch on CPU."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from torch.utils.data import DataLoader

from mfu_callbacks.accelerate import MFUTracker
from tests.conftest import SEQ, FixedLengthTokens, HookSpy, collate, step_truth, tiny_llama, torchrun
from tests.helpers.fakes import FLOPS_PER_TOKEN, SECONDS_PER_BATCH

PEAK_TFLOPS = 0.5
BATCH = 4


class MemoryTracker(GeneralTracker):
    """A real Accelerate tracker that keeps what it is given."""

    name = "memory"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict]] = []

    @property
    def tracker(self):
        return self.records

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.records.append((step, dict(values)))


def run_loop(
    *,
    lora: bool = False,
    accumulation: int = 1,
    steps: int = 8,
    with_tracker: bool = True,
    spy: HookSpy | None = None,
):
    memory = MemoryTracker()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, log_with=[memory])
    accelerator.init_trackers("test")
    model = tiny_llama(lora=lora)
    if spy is not None:
        spy.attach(model, model.model.layers[0])
    optimizer = torch.optim.SGD((p for p in model.parameters() if p.requires_grad), lr=0.1)
    loader = DataLoader(FixedLengthTokens(BATCH * steps * accumulation), batch_size=BATCH, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if with_tracker:
        MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=1, log_interval=2)
    losses = []
    for step, batch in enumerate(loader):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        accelerator.log({"train/loss": loss.item()}, step=step)
    accelerator.end_training()
    return memory.records, losses, accelerator.unwrap_model(model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_mfu_reaches_the_tracker_with_the_loss_and_matches_an_independent_count(lora):
    records, _, _ = run_loop(lora=lora)
    measured = [(step, values) for step, values in records if "train/mfu" in values]
    assert len(measured) >= 2, records
    step_flops = step_truth(tiny_llama(lora=lora), collate([FixedLengthTokens(8)[i] for i in range(BATCH)]))
    for _, values in measured:
        assert "train/loss" in values
        step_time = values["train/step_time"]
        assert values["train/mfu"] == pytest.approx(step_flops / (step_time * PEAK_TFLOPS * 1e12), rel=1e-6)


def test_user_hooks_never_see_the_engine_build_and_mfu_stays_on():
    with HookSpy() as spy:
        records, _, _ = run_loop(spy=spy)
    assert spy.calls > 0 and spy.meta_calls == 0
    measured = [values for _, values in records if "train/mfu" in values]
    assert len(measured) >= 2, records
    step_flops = step_truth(tiny_llama(), collate([FixedLengthTokens(8)[i] for i in range(BATCH)]))
    for values in measured:
        assert values["train/mfu"] == pytest.approx(
            step_flops / (values["train/step_time"] * PEAK_TFLOPS * 1e12), rel=1e-6
        )


def test_gradient_accumulation_ends_a_step_only_when_the_optimizer_steps(fake_meter):
    records, _, _ = run_loop(accumulation=2, steps=8)
    measured = [values for _, values in records if "train/mfu" in values]
    assert measured
    micro_flops = BATCH * SEQ * FLOPS_PER_TOKEN
    for values in measured:
        assert values["train/step_time"] == pytest.approx(2 * SECONDS_PER_BATCH)
        assert values["train/tflops_per_gpu"] == pytest.approx(
            2 * micro_flops / values["train/step_time"] / 1e12, rel=1e-6
        )


def test_losses_and_weights_are_identical_with_and_without_the_tracker():
    _, losses_a, model_a = run_loop(with_tracker=True)
    _, losses_b, model_b = run_loop(with_tracker=False)
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tests.conftest import FixedLengthTokens, collate, tiny_llama
    from mfu_callbacks.accelerate import MFUTracker

    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(FixedLengthTokens(64), batch_size=4, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = MFUTracker(accelerator, model, peak_tflops=0.5, warmup_steps=1, log_interval=3)
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == 6:
            break
    assert accelerator.num_processes == 2
    if accelerator.is_main_process:
        print("METRICS", json.dumps(tracker.latest))
    accelerator.end_training()
    sys.stdout.flush()
    # Leave at once: gloo's teardown at interpreter exit can abort a process (SIGABRT) after its work is done.
    import os
    os._exit(0)
    """
)


@pytest.mark.multiprocess
def test_two_processes_under_torchrun(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT.format(root=str(Path(__file__).parents[2])))
    # torchrun sets the environment Accelerate reads; `accelerate launch --cpu` would start one process.
    metrics, *_ = torchrun(script, tag="METRICS", timeout=240)
    # 32 sequences per step over two ranks (each 4 rows x 16 tokens... per rank): tokens/s counts both ranks.
    assert metrics["train/tokens_per_sec"] == pytest.approx(2 * 4 * 16 / metrics["train/step_time"], rel=0.05)
    assert metrics["train/tokens_per_sec_per_gpu"] == pytest.approx(
        4 * 16 / metrics["train/step_time"], rel=0.05
    )
    assert metrics["train/step_time_max"] >= metrics["train/step_time_min"]


def test_an_internal_error_is_logged_once_and_training_goes_on(monkeypatch, caplog, fake_meter):
    import logging

    from mfu_callbacks.meter import MFUMeter

    def broken(self, *args, **kwargs):
        raise RuntimeError("deliberate failure")

    _, clean_losses, _ = run_loop(with_tracker=False)
    monkeypatch.setattr(MFUMeter, "end_step", broken)
    with caplog.at_level(logging.ERROR, logger="mfu_callbacks"):
        records, losses, _ = run_loop(with_tracker=True)
    assert losses == clean_losses
    assert len([r for r in caplog.records if "stopped measuring MFU" in r.getMessage()]) == 1
    assert not any("train/mfu" in values for _, values in records)


# -- checkpoints: the run totals as JSON beside Accelerate's files, never a pickle -------------------
def checkpointed_run(
    folder: Path, *, tracker: bool, load_from: Path | None = None, save_to: Path | None = None, steps: int = 3
) -> MFUTracker | None:
    """A loop of ``steps`` steps, with or without the tracker, resumed from ``load_from`` and saved to ``save_to``."""
    accelerator = Accelerator(cpu=True, project_dir=str(folder))
    model = tiny_llama()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-2))
    mfu = (
        MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=0, log_interval=100)
        if tracker
        else None
    )
    if load_from is not None:
        accelerator.load_state(str(load_from))
    batch = collate([FixedLengthTokens(BATCH)[i] for i in range(BATCH)])
    for _ in range(steps):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    if mfu is not None:
        mfu.metrics()
    if save_to is not None:
        accelerator.save_state(str(save_to))
    if mfu is not None:
        mfu.close()
    return mfu


def test_a_checkpoint_saved_with_the_tracker_loads_without_it_and_holds_no_pickle(tmp_path):
    checkpointed_run(tmp_path, tracker=True, save_to=tmp_path / "state")
    assert (tmp_path / "state" / "mfu_state.json").is_file()
    assert not list((tmp_path / "state").glob("custom_checkpoint_*"))
    checkpointed_run(
        tmp_path, tracker=False, load_from=tmp_path / "state"
    )  # no "Number of custom checkpoints"


def test_a_checkpoint_saved_without_the_tracker_loads_with_it_and_mfu_starts_afresh(tmp_path):
    checkpointed_run(tmp_path, tracker=False, save_to=tmp_path / "state")
    resumed = checkpointed_run(tmp_path, tracker=True, load_from=tmp_path / "state")
    assert resumed is not None and resumed.latest["train/mfu"] > 0
    assert (
        resumed.state_dict()["run"]["steps"] == 2
    )  # this run's steps after the first (which built the engine)


def test_a_round_trip_keeps_the_run_totals(tmp_path):
    first = checkpointed_run(tmp_path, tracker=True, save_to=tmp_path / "state")
    resumed = checkpointed_run(tmp_path, tracker=True, load_from=tmp_path / "state", steps=0)
    assert first is not None and resumed is not None
    assert (
        resumed.state_dict()["run"] == first.state_dict()["run"] and first.state_dict()["run"]["steps"] == 2
    )


class RunsCode:
    """A pickle that, unpickled, would write a file: what a tampered checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("content", ["pickle", "garbage", "list", "other_version", "bad_totals"])
def test_a_tampered_state_file_is_ignored_with_one_warning(tmp_path, caplog, content):
    import logging
    import pickle

    checkpointed_run(tmp_path, tracker=True, save_to=tmp_path / "state")
    state = tmp_path / "state" / "mfu_state.json"
    marker = tmp_path / "marker"
    written = json.loads(state.read_text())
    contents = {
        "pickle": pickle.dumps(RunsCode(marker)),
        "garbage": b"\xff\x00{not json",
        "list": b"[1, 2, 3]",
        "other_version": json.dumps({**written, "version": 999}).encode(),
        "bad_totals": json.dumps({**written, "run": "nonsense"}).encode(),
    }
    state.write_bytes(contents[content])
    with caplog.at_level(logging.WARNING, logger="mfu_callbacks.accelerate"):
        resumed = checkpointed_run(tmp_path, tracker=True, load_from=tmp_path / "state")
    warnings = [record for record in caplog.records if "mfu_state.json" in record.getMessage()]
    assert len(warnings) == 1 and "start afresh" in warnings[0].getMessage()
    assert not marker.exists()
    assert resumed is not None and resumed.latest["train/mfu"] > 0
    assert resumed.state_dict()["run"]["steps"] == 2  # measuring went on, from a fresh start


# -- never overwrite the loop's keys; evaluation and saves are not training --------------------------
def evaluating_loop(folder: Path, clock, *, steps: int = 12, step_time_of_its_own: bool = False):
    """The README loop, logging every step; every 2 steps an evaluation (eval mode, no grad) and a
    ``save_state``, each moving the meter's clock on."""
    memory = MemoryTracker()
    accelerator = Accelerator(cpu=True, log_with=[memory], project_dir=str(folder))
    accelerator.init_trackers("test")
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(FixedLengthTokens(BATCH * steps), batch_size=BATCH, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = MFUTracker(accelerator, model, peak_tflops=PEAK_TFLOPS, warmup_steps=1, log_interval=2)
    accelerator.register_save_state_pre_hook(lambda *args: clock.advance(5.0))
    evaluation = [collate([FixedLengthTokens(BATCH)[i] for i in range(BATCH)])] * 3
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        values = {"train/loss": loss.item()}
        if step_time_of_its_own:
            values["train/step_time"] = 123.0
        accelerator.log(values, step=step)
        if step % 2 == 1:
            model.eval()
            with torch.no_grad():
                for eval_batch in evaluation:
                    # The pause opens at the first eval-mode forward: what comes before it (building the
                    # evaluation's loader, its first batch) is not seen as evaluation (README says so).
                    model(**eval_batch)
                    clock.advance(1.0)
            model.train()
            accelerator.save_state(str(folder / "state"))
    accelerator.end_training()
    return tracker, [values for _, values in memory.records if "train/mfu" in values]


def test_a_key_the_loop_logs_itself_keeps_its_value_and_ours_goes_beside_it(tmp_path, fake_meter):
    _, measured = evaluating_loop(tmp_path, fake_meter, step_time_of_its_own=True)
    assert len(measured) >= 2
    for values in measured:
        assert values["train/step_time"] == 123.0
        assert values["train/mfu/step_time"] == pytest.approx(SECONDS_PER_BATCH)


def test_evaluation_and_save_state_are_neither_step_time_nor_input_wait(tmp_path, fake_meter):
    tracker, measured = evaluating_loop(tmp_path, fake_meter)
    assert len(measured) >= 5
    for values in measured:
        assert values["train/step_time"] == pytest.approx(SECONDS_PER_BATCH)
        assert values["train/input_wait_fraction"] == pytest.approx(0.0, abs=1e-9)
    assert tracker.session.meter._reader.run.steps >= 10
    assert "input_bound" not in [d.id for d in tracker.session.meter.diagnostics()]
