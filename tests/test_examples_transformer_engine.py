"""The Transformer Engine example's declared FLOPs, run with its stand-in layers, against FlopCounterMode.

The stand-ins compute what Transformer Engine's layers compute in torch operations (eager attention), so
FlopCounterMode of one step is the truth: the declared linears are the FLOPs in fp8, attention and
the head those in the run's dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks.flops import declared as declared_module
from mfu_callbacks.flops.dtypes import RUN_DTYPE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import transformer_engine_declared as example  # noqa: E402


@pytest.fixture(autouse=True)
def declarations_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example declares FLOPs for its classes: other tests never see them."""
    monkeypatch.setattr(declared_module, "_BY_CLASS", dict(declared_module._BY_CLASS))


def step_truth(model: torch.nn.Module, batch: dict) -> tuple[int, int]:
    """FlopCounterMode of one step: FLOPs of the fp8 layers (QKV, output projection, MLP) and of the rest."""
    with FlopCounterMode(display=False) as counter:
        model(**batch).backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()
    in_fp8 = sum(
        sum(counts.get(f"Model.layers.{i}.{part}", {}).values())
        for i in range(len(model.layers))
        for part in ("qkv", "proj", "mlp")
    )
    return in_fp8, counter.get_total_flops() - in_fp8


@pytest.mark.parametrize("seq_len", [16, pytest.param(24, marks=pytest.mark.slow)])
def test_declared_transformer_engine_layers_count_like_what_they_compute(seq_len: int) -> None:
    steps, batch_size, vocab = 3, 2, 256
    torch.manual_seed(0)
    meter = example.main(["--steps", str(steps), "--seq-len", str(seq_len), "--batch", str(batch_size)])
    flops = meter.run_flops()
    assert flops is not None and meter.engine is not None
    ids = torch.randint(vocab, (batch_size, seq_len))
    model = example.Model(example.STAND_INS, vocab, 64, 2, 4)
    in_fp8, rest = step_truth(model, {"input_ids": ids, "labels": ids})
    measured = steps - 1  # the first step builds the engine
    assert flops.model_by_dtype == {"fp8": in_fp8 * measured, RUN_DTYPE: rest * measured}
    assert flops.breakdown["mlp"] > 0 and flops.breakdown["attention_scores"] > 0
    assert list(meter.matmul_dtypes()) == ["fp8", "fp32"]
