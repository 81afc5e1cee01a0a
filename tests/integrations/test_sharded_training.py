"""Each integration under sharded training: two gloo processes under torchrun on CPU, a tiny Llama.

What each stack does on CPU (Lightning 2.6, Accelerate 1.15, transformers 5.2x, torch 2.13):

- Accelerate: ``FullyShardedDataParallelPlugin(fsdp_version=2)`` is ignored on CPU without a word:
  ``AcceleratorState`` switches to FSDP only from a GPU-type distributed type, so a CPU job stays
  ``MULTI_CPU`` and ``prepare`` wraps the model in DDP. The HF Trainer builds its Accelerator the
  same way, so ``fsdp="full_shard"`` on CPU trains with DDP too. Both scripts below let Accelerate
  take its GPU branch (``PartialState().distributed_type = MULTI_GPU`` before the Accelerator is
  built): Accelerate's own FSDP2 preparation then runs on the CPU processes.
- Lightning: ``FSDPStrategy`` refuses the CPU ("The strategy `fsdp` requires a GPU accelerator, but
  received `accelerator='cpu'`..."); the Lightning script checks what it would wrap (torch's FSDP1,
  which runs on CPU with ``device_id=torch.device("cpu")``) with the meter directly.
  ``ModelParallelStrategy`` runs on CPU: FSDP2 through ``configure_model``.

Every assertion of a stack reads its one launch. The logged rows must say two GPUs, per-step model
FLOPs summed over the ranks equal to FlopCounterMode on the global batch, and the run summary
must state the world size and the parallel layout.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mfu_callbacks.testing import reference_step_flops
from tests.conftest import SEQ, FixedLengthTokens, collate, tiny_llama, torchrun

pytestmark = pytest.mark.multiprocess

WORLD_SIZE = 2
ROWS = 4  # per rank and step
STEPS = 7  # warm-up 1, reads after steps 3 and 6 (and at the end)

COMMON = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.conftest import FixedLengthTokens, collate, tiny_llama
OUT = {out!r}
RANK = int(os.environ["RANK"])


def finish(rows, summary_dir, **extra):
    if RANK == 0:
        from mfu_callbacks.runs.summary import RunSummary
        written = RunSummary.read(summary_dir)
        summary = {{"setup": written.setup, "windows": written.windows}}
        print("RESULT", json.dumps({{"rows": rows, "summary": summary, **extra}}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown at interpreter exit can abort a process after its work is done


def take_accelerates_gpu_branch():
    # Accelerate turns FSDP on only from a GPU-type distributed type; on CPU it would use DDP instead.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    PartialState().distributed_type = DistributedType.MULTI_GPU
"""

ACCELERATE = (
    COMMON
    + """
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.utils.data import DataLoader
from mfu_callbacks.accelerate import MFUTracker

take_accelerates_gpu_branch()
plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
)
accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, project_dir=OUT)
model = tiny_llama()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(FixedLengthTokens(64), batch_size={rows}, collate_fn=collate)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
tracker = MFUTracker(accelerator, model, peak_tflops=0.5, warmup_steps=1, log_interval=3)
rows = []
for step, batch in enumerate(loader):
    loss = model(**batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    if tracker.latest:
        rows.append(tracker.latest)
        tracker.latest = {{}}
    if step + 1 == {steps}:
        break
tracker.finish()
finish(rows, OUT, wrapper=type(model).__name__, distributed_type=str(accelerator.state.distributed_type))
"""
)

TRAINER = (
    COMMON
    + """
from transformers import Trainer, TrainerCallback, TrainingArguments
from mfu_callbacks.transformers import MFUCallback

class Rows(TrainerCallback):
    rows = []
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "mfu" in logs:
            self.rows.append(dict(logs))

args = TrainingArguments(
    output_dir=OUT, max_steps={steps}, per_device_train_batch_size={rows}, logging_steps=3, learning_rate=1e-3,
    report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
    fsdp="full_shard", fsdp_config={{"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
)
take_accelerates_gpu_branch()
# Default options: the Trainer re-registers generate() under FSDP2, which the copy rebinds.
callback = MFUCallback(peak_tflops=0.5, warmup_steps=1)
trainer = Trainer(model=tiny_llama(), args=args, train_dataset=FixedLengthTokens(64), data_collator=collate,
                  callbacks=[callback, Rows()])
trainer.train()
finish(Rows.rows, OUT, wrapper=type(trainer.model_wrapped).__name__,
       distributed_type=str(trainer.accelerator.state.distributed_type))
"""
)

LIGHTNING = (
    COMMON
    + """
import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.utils.data import DataLoader
from mfu_callbacks.lightning import MFUCallback
from mfu_callbacks.meter import MFUMeter

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = None
        self.logged = []
    def configure_model(self):
        if self.model is not None:
            return
        self.model = tiny_llama()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss
    def log_dict(self, dictionary, *args, **kwargs):  # what the MFU callback logs, window by window
        self.logged.append({{key: float(value) for key, value in dictionary.items()}})
        return super().log_dict(dictionary, *args, **kwargs)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

module = Module()
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps={steps}, logger=False,
                    log_every_n_steps=3, callbacks=[MFUCallback(peak_tflops=0.5, warmup_steps=1)],
                    default_root_dir=OUT, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(module, DataLoader(FixedLengthTokens(64), batch_size={rows}, collate_fn=collate))
rows = [row for row in module.logged if "train/mfu" in row]

# FSDPStrategy refuses the CPU: what it wraps the model in, torch's FSDP1, with the meter directly.
model = FullyShardedDataParallel(tiny_llama(), device_id=torch.device("cpu"))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
meter = MFUMeter(model, peak_tflops=0.5, warmup_steps=1)
data = FixedLengthTokens(64)
fsdp1_rows = []
for step in range({steps}):
    batch = collate([data[(2 * step + RANK) * {rows} + i] for i in range({rows})])
    meter.start_step(batch)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    meter.end_step()
    if step % 3 == 2:
        fsdp1_rows.append(meter.metrics())
fsdp1_layout = meter.parallelism.as_config()
finish(rows, trainer.log_dir, fsdp1_rows=fsdp1_rows, fsdp1_layout=fsdp1_layout)
"""
)


def launch(script: str, folder: Path) -> dict:
    """Run ``script`` on two CPU processes under torchrun; rank 0's RESULT line."""
    path = folder / "train.py"
    path.write_text(
        textwrap.dedent(script).format(
            root=str(Path(__file__).parents[2]), out=str(folder / "out"), rows=ROWS, steps=STEPS
        )
    )
    result, *_ = torchrun(path, tag="RESULT", timeout=180)
    return result


@pytest.fixture(scope="module")
def global_step_flops() -> int:
    """FlopCounterMode on one step of the global batch: both ranks' rows in one batch, one process."""
    data = FixedLengthTokens(64)
    return reference_step_flops(tiny_llama(), collate([data[i] for i in range(WORLD_SIZE * ROWS)]))


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory) -> dict:
    return launch(ACCELERATE, tmp_path_factory.mktemp("accelerate_fsdp2"))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> dict:
    return launch(TRAINER, tmp_path_factory.mktemp("trainer_fsdp2"))


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> dict:
    return launch(LIGHTNING, tmp_path_factory.mktemp("lightning_model_parallel"))


def check_rows(rows: list[dict], prefix: str, step_flops: int, *, integration: bool = True) -> None:
    """Rows of two GPUs whose FLOPs, summed over the ranks, are those of the global batch."""
    assert len(rows) >= 2, rows
    for row in rows:
        if integration:  # the integrations add the status; the meter alone does not
            assert row[prefix + "mfu_status"] == 1
        # Both GPUs: tokens per second over the job and per GPU.
        assert row[prefix + "tokens_per_sec"] / row[prefix + "tokens_per_sec_per_gpu"] == pytest.approx(2)
        assert row[prefix + "tokens_per_sec"] * row[prefix + "step_time"] == pytest.approx(
            WORLD_SIZE * ROWS * SEQ
        )
        # Per step: FLOP/s per GPU x seconds per step x GPUs.
        logged = row[prefix + "tflops_per_gpu"] * 1e12 * row[prefix + "step_time"] * WORLD_SIZE
        assert logged == pytest.approx(step_flops, rel=0.01)
        assert row[prefix + "mfu"] == pytest.approx(row[prefix + "tflops_per_gpu"] / 0.5)


FSDP2_ON_TWO = {
    "engine": "fsdp2",
    "data_parallel": 2,
    "fsdp_shard": 2,
    "dp_replicate": 1,
    "tensor_parallel": 1,
}


def check_summary(summary: dict, dimension: str) -> None:
    setup = summary["setup"]
    assert setup["world_size"] == 2
    assert setup["parallelism"] == {**FSDP2_ON_TWO, "mesh": {dimension: 2}}
    assert summary["windows"], "the windows were written"


def test_accelerate_fsdp2(accelerate_run, global_step_flops):
    assert accelerate_run["wrapper"].startswith("FSDP"), accelerate_run["wrapper"]
    assert accelerate_run["distributed_type"] == "DistributedType.FSDP"
    check_rows(accelerate_run["rows"], "train/", global_step_flops)
    check_summary(accelerate_run["summary"], "dim0")  # an unnamed mesh


def test_hf_trainer_fsdp2(trainer_run, global_step_flops):
    assert trainer_run["wrapper"].startswith("FSDP"), trainer_run["wrapper"]
    check_rows(trainer_run["rows"], "", global_step_flops)
    check_summary(trainer_run["summary"], "dim0")


def test_lightning_model_parallel_strategy_fsdp2(lightning_run, global_step_flops):
    check_rows(lightning_run["rows"], "train/", global_step_flops)
    check_summary(lightning_run["summary"], "data_parallel")


def test_fsdp1_as_lightning_fsdp_strategy_wraps_it(lightning_run, global_step_flops):
    check_rows(lightning_run["fsdp1_rows"], "", global_step_flops, integration=False)
    assert lightning_run["fsdp1_layout"] == {**FSDP2_ON_TWO, "engine": "fsdp1"}


@pytest.fixture(scope="module")
def scale_out_rows() -> dict[str, dict]:
    """``benchmarks/bench_scale_out.py --engine all --smoke``: the five engines in one launch."""
    benchmarks = Path(__file__).parents[2] / "benchmarks"
    rows = torchrun(
        benchmarks / "bench_scale_out.py",
        "--engine",
        "all",
        "--smoke",
        tag="RESULT",
        timeout=180,
        cwd=benchmarks,
    )
    return {row["engine"]: row for row in rows}


def test_the_scale_out_benchmark_runs_every_engine(scale_out_rows):
    assert sorted(scale_out_rows) == ["ddp", "fsdp1", "fsdp2", "fsdp2_tp", "tp"]
    for row in scale_out_rows.values():
        assert row["world_size"] == 2
        assert row["tokens_ratio"] == pytest.approx(1.0), row  # a TP pair's batch counts once
        assert row["logged_mfu"] > 0 and row["truth_mfu"] > 0
    # Each rank counts what it runs (under TP, its share of every sharded matmul and of the work the
    # group repeats): the ranks' sum is the global batch's model FLOPs for every engine.
    for engine in ("ddp", "fsdp1", "fsdp2", "tp", "fsdp2_tp"):
        assert scale_out_rows[engine]["flops_ratio"] == pytest.approx(1.0, rel=0.01), engine
    layouts = {engine: row["parallelism"] for engine, row in scale_out_rows.items()}
    assert [layouts[e]["engine"] for e in ("ddp", "fsdp1", "fsdp2", "tp", "fsdp2_tp")] == [
        "ddp",
        "fsdp1",
        "fsdp2",
        "none",
        "fsdp2",
    ]
    assert (layouts["tp"]["tensor_parallel"], layouts["tp"]["data_parallel"]) == (2, 1)
    assert (layouts["fsdp2_tp"]["tensor_parallel"], layouts["fsdp2_tp"]["fsdp_shard"]) == (2, 1)
