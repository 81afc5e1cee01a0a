"""A fault on one rank never hangs or crashes a distributed job: two gloo processes under torchrun
(Accelerate, the HF Trainer, Lightning DDP),
rank 1 alone hit by a batch it cannot count, a token counter that raises, and a FLOP engine that
breaks while metrics are read. Each run must finish, on both ranks, with the losses it has without
the callback."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import torchrun

pytestmark = pytest.mark.multiprocess

COMMON = """
import json, os, sys, time, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
from tests.conftest import FixedLengthTokens, collate, tiny_llama
from mfu_callbacks.flops import FlopEngine

FAULT = {fault!r}
RANK = int(os.environ["RANK"])


def counter(batch):
    # Rank 1 alone: a batch it cannot count at step 3, or a counter that raises at step 3 (the real
    # step is not watched, so that the engine's build calls the counter as often on every run).
    counter.calls = getattr(counter, "calls", 0) + 1
    if RANK == 1 and counter.calls == 3:
        if FAULT == "uncountable":
            return {{}}
        if FAULT == "raising":
            raise RuntimeError("the token counter failed on rank 1")
    return {{"input_ids": batch["input_ids"]}}


if FAULT == "engine" and RANK == 1:
    evaluate = FlopEngine.evaluate
    def broken(self, features):
        raise RuntimeError("the FLOP engine failed on rank 1")
    FlopEngine.evaluate = broken

# Rank 1 alone, at its second read: before the reduction (packing its window), inside it (before its
# all-reduce: the other rank waits out MFU_REDUCTION_TIMEOUT) or after it (unpacking the result).
import mfu_callbacks.distributed as _distributed, mfu_callbacks._meter_read as _meter
_PLACES = {{"before": (_meter, "pack"), "inside": (_distributed, "_collective_device"), "after": (_meter, "unpack")}}
if FAULT in _PLACES and RANK == 1:
    _module, _name = _PLACES[FAULT]
    _original = getattr(_module, _name)
    def _failing(*args, _calls=[0], **kwargs):
        _calls[0] += 1
        if _calls[0] == 2:
            raise RuntimeError(f"injected on rank 1 {{FAULT}} the reduction")
        return _original(*args, **kwargs)
    setattr(_module, _name, _failing)


def finish(losses, metrics):
    if RANK == 0:
        print("RESULT", json.dumps({{"losses": losses, "metrics": metrics}}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown at interpreter exit can abort a process after its work is done
"""

ACCELERATE = (
    COMMON
    + """
from accelerate import Accelerator
from torch.utils.data import DataLoader
from mfu_callbacks.accelerate import MFUTracker

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = tiny_llama()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(FixedLengthTokens(64), batch_size=4, collate_fn=collate)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
tracker = None
if FAULT != "none":
    tracker = MFUTracker(accelerator, model, peak_tflops=0.5, warmup_steps=0, log_interval=2, token_counter=counter, real_step="off")
losses, metrics = [], []
for step, batch in enumerate(loader):
    loss = model(**batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(round(loss.item(), 6))
    accelerator.log({{"train/loss": loss.item()}}, step=step)
    if tracker is not None and tracker.latest:
        metrics.append(tracker.latest)
    if FAULT == "main_only" and accelerator.is_main_process and step == 4:
        tracker.metrics()  # the common mistake: a collective on one rank only
    if step == 7:
        break
if tracker is not None:
    tracker.finish()
finish(losses, metrics)
"""
)

TRAINER = (
    COMMON
    + """
from transformers import Trainer, TrainerCallback, TrainingArguments
from mfu_callbacks.transformers import MFUCallback

class Losses(TrainerCallback):
    def __init__(self):
        self.losses, self.metrics = [], []
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(round(logs["loss"], 6))
            if "mfu" in logs or "step_time" in logs:
                self.metrics.append(dict(logs))

args = TrainingArguments(output_dir={out!r}, max_steps=8, per_device_train_batch_size=4, logging_steps=2,
                         learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                         seed=0, data_seed=0, dataloader_num_workers=0)
recorder = Losses()
callbacks = [recorder]
if FAULT != "none":
    callbacks.insert(0, MFUCallback(peak_tflops=0.5, warmup_steps=0, token_counter=counter, real_step="off"))
trainer = Trainer(model=tiny_llama(), args=args, train_dataset=FixedLengthTokens(64), data_collator=collate,
                  callbacks=callbacks)
trainer.train()
finish(recorder.losses, recorder.metrics)
"""
)

LIGHTNING = (
    COMMON
    + """
import lightning as L
from torch.utils.data import DataLoader
from mfu_callbacks.lightning import MFUCallback

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()
        self.logged = []
    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss
    def log_dict(self, dictionary, *args, **kwargs):  # what the MFU callback logs, window by window
        self.logged.append({{key: float(value) for key, value in dictionary.items()}})
        return super().log_dict(dictionary, *args, **kwargs)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class Losses(L.Callback):
    def __init__(self):
        self.losses = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(round(outputs["loss"].item(), 6))

torch.manual_seed(0)
module = Module()
losses = Losses()
callbacks = [losses]
if FAULT != "none":
    callbacks.insert(0, MFUCallback(peak_tflops=0.5, warmup_steps=0, log_interval=2, token_counter=counter, real_step="off"))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False, callbacks=callbacks,
                    default_root_dir={out!r}, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, DataLoader(FixedLengthTokens(64), batch_size=4, collate_fn=collate))
finish(losses.losses, module.logged)
"""
)


def run(script: str, tmp_path: Path, fault: str, *, stderr: list | None = None) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{fault}.py"
    path.write_text(
        textwrap.dedent(script).format(
            root=str(Path(__file__).parents[1]), fault=fault, out=str(tmp_path / f"out-{fault}")
        )
    )
    # A hang (the old behaviour) runs into this limit; a healthy run takes seconds.
    start = time.perf_counter()
    result, *_ = torchrun(path, tag="RESULT", timeout=120, env={"MFU_REDUCTION_TIMEOUT": "3"}, stderr=stderr)
    return {**result, "seconds": time.perf_counter() - start}


def finishes_like_the_plain_run(faulty: dict, plain: dict) -> None:
    """Within the plain run's time, give or take the engine build and a busy machine's noise."""
    assert faulty["seconds"] < 2 * plain["seconds"] + 15, (faulty["seconds"], plain["seconds"])


# Each integration's script and the prefix its logged metrics carry (the Trainer's reporters add their own).
INTEGRATIONS = {
    "accelerate": (ACCELERATE, "train/"),
    "trainer": (TRAINER, ""),
    "lightning": (LIGHTNING, "train/"),
}


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> dict[str, dict]:
    """Each loop without the callback, run once: the losses a faulty run must reproduce."""
    folder = tmp_path_factory.mktemp("plain")
    return {name: run(script, folder / name, "none") for name, (script, _) in INTEGRATIONS.items()}


@pytest.mark.parametrize("fault", ["uncountable", "raising", "engine"])
@pytest.mark.parametrize("integration", list(INTEGRATIONS))
def test_a_fault_on_one_rank_finishes_the_job(tmp_path, plain_runs, integration, fault):
    script, prefix = INTEGRATIONS[integration]
    plain = plain_runs[integration]
    faulty = run(script, tmp_path, fault)
    assert faulty["losses"] == plain["losses"]
    finishes_like_the_plain_run(faulty, plain)
    assert faulty["metrics"], "rank 0 went on measuring"
    last = faulty["metrics"][-1]
    if fault == "uncountable":  # one step left out on rank 1; MFU stays
        assert prefix + "mfu" in last and last[prefix + "mfu_status"] == 1
    else:  # rank 1 stopped measuring: MFU of rank 0 alone would pass for the job's, so it is left out
        assert prefix + "mfu" not in last and prefix + "step_time" in last
        assert last[prefix + "mfu_status"] == -2, "rank 0's rows say that a rank could not count"


@pytest.mark.parametrize(
    "integration, place",
    # The read is the session's in all three: the reduction itself under each, and after it under
    # Accelerate (a two-rank launch costs 15-40 s on a 2-core machine; a fault before the reduction is
    # the "engine" fault of the test above, in all three).
    [(integration, "inside") for integration in INTEGRATIONS] + [("accelerate", "after")],
)
def test_a_fault_on_one_rank_before_in_or_after_the_reduction_finishes_the_job(
    tmp_path, plain_runs, integration, place
):
    """Every rank enters exactly one reduction per read whatever fails: the job finishes with the
    plain run's losses, rank 0 logged a first window, and no rank hung (a fault inside the
    reduction costs the other rank one MFU_REDUCTION_TIMEOUT, 3 s here)."""
    script, prefix = INTEGRATIONS[integration]
    plain = plain_runs[integration]
    faulty = run(script, tmp_path, place)
    assert faulty["losses"] == plain["losses"]
    finishes_like_the_plain_run(faulty, plain)
    assert faulty["metrics"] and prefix + "mfu_status" in faulty["metrics"][-1]


def test_accelerate_a_read_on_the_main_process_only_ends_with_the_message_not_a_hang(tmp_path, plain_runs):
    errors: list = []
    plain = plain_runs["accelerate"]
    faulty = run(ACCELERATE, tmp_path, "main_only", stderr=errors)
    assert faulty["losses"] == plain["losses"]
    finishes_like_the_plain_run(faulty, plain)
    (log,) = errors
    assert "a read ran on some ranks only" in log
    assert "`if accelerator.is_main_process:`" in log and "tracker.latest" in log
