"""fp8 linears (``tests/helpers/fp8.py``) counted like the linears they replace, against FlopCounterMode.

Each step runs for real on CPU: ``torch._scaled_mm`` runs there in torch 2.13 (tensorwise and rowwise
scales), so nothing is faked. The truth is FlopCounterMode's count of the same step of the plain twin
(the same weights in ``nn.Linear``), per component by the modules FlopCounterMode attributes its
FLOPs to; FlopCounterMode of the fp8 step itself counts its ``_scaled_mm`` (or the ``mm`` of two fp8
subclass tensors) forward and backward, and is the truth of its hardware FLOPs.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks import MFUMeter
from mfu_callbacks.flops.dtypes import RUN_DTYPE
from mfu_callbacks.testing import causal_lm, make_eager, reference_step_flops
from tests.conftest import VOCAB, assert_flops, full_batch
from tests.helpers.fp8 import RECIPES, Float8Linear, convert_to_fp8

LAYERS = 2
BATCHES = [full_batch(2, 16), full_batch(2, 16, seed=1), full_batch(3, 24)]  # the first builds the engine


def twins(recipe: str) -> tuple[nn.Module, nn.Module]:
    """A tiny Llama with its decoder linears in fp8 (head in full precision), and its plain twin."""
    twin = make_eager(causal_lm(vocab=VOCAB, layers=LAYERS, kv_heads=2, attention="eager"))
    return convert_to_fp8(copy.deepcopy(twin), recipe), twin


def train(model: nn.Module, batches: list[dict], **options: Any) -> MFUMeter:
    meter = MFUMeter(model, peak_tflops=1.0, warmup_steps=0, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in batches:
        meter.start_step(batch)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end_step()
    meter.metrics()
    return meter


def component_truth(model: nn.Module, batch: dict) -> dict[str, int]:
    """FLOPs of one step of the plain twin per component, from FlopCounterMode's counts per module and op.

    Its backward attribution leaks between sibling modules (part of q_proj's backward lands on k_proj and
    v_proj, the scores' on the decoder layer), so only totals it gets right are read: each decoder layer's
    ``mm`` (projections and MLP) and ``bmm`` (eager attention's scores and values), each MLP's, the head's.
    """
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()
    aten = torch.ops.aten

    def layers(part: str, op: Any) -> int:
        return sum(
            counts.get(f"LlamaForCausalLM.model.layers.{i}{part}", {}).get(op, 0) for i in range(LAYERS)
        )

    parts = {
        "attention_projections": layers("", aten.mm) - layers(".mlp", aten.mm),
        "attention_scores": layers("", aten.bmm),
        "mlp": layers(".mlp", aten.mm),
        "head": counts["LlamaForCausalLM.lm_head"][aten.mm],
    }
    assert sum(parts.values()) == counter.get_total_flops(), "every FLOP belongs to one of the parts"
    return parts


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize(
    "recipe, real_step",
    [
        # One run per recipe and per real_step in the unit tier; the rest of the grid in the slow tier.
        (recipe, real_step)
        if (RECIPES.index(recipe) + index) % 3 == 0
        else pytest.param(recipe, real_step, marks=pytest.mark.slow)
        for recipe in RECIPES
        for index, real_step in enumerate(["check", "only", "off"])
    ],
)
def test_an_fp8_step_counts_like_its_plain_twin_per_component(recipe: str, real_step: str) -> None:
    model, twin = twins(recipe)
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 7 * LAYERS
    meter = train(model, BATCHES, real_step=real_step)
    flops = meter.run_flops()
    assert flops is not None and meter.engine is not None
    measured = BATCHES[1:]
    assert_flops(
        flops.model_flops, sum(reference_step_flops(twin, b) for b in measured), "model FLOPs logged"
    )
    for batch in measured:  # lengths 16 and 24
        step = meter.engine.estimate(batch)
        assert_flops(step.model_flops, reference_step_flops(twin, batch), "model FLOPs: the twin's")
        assert_flops(
            step.hardware_flops, reference_step_flops(model, batch), "hardware FLOPs: the fp8 step's"
        )
        truth = component_truth(twin, batch)
        assert step.breakdown == truth, f"per component: {step.breakdown} vs the twin's {truth}"
        in_fp8 = (
            truth["attention_projections"] + truth["mlp"]
        )  # the converted linears; the rest in the run's dtype
        by_dtype = {"fp8": in_fp8, RUN_DTYPE: truth["attention_scores"] + truth["head"]}
        assert step.model_by_dtype == by_dtype, f"per dtype: {step.model_by_dtype} vs {by_dtype}"


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize(
    "recipe", [RECIPES[0], *(pytest.param(recipe, marks=pytest.mark.slow) for recipe in RECIPES[1:])]
)
def test_fp8_linears_without_checkpointing_are_no_recompute(recipe: str) -> None:
    """The real step (the default check, and alone) sees the fp8 backward's matmuls; none is a rerun."""
    for real_step in ("check", "only"):
        model, twin = twins(recipe)
        meter = train(model, BATCHES, real_step=real_step)
        assert "recompute_cost" not in [d.id for d in meter.diagnostics()]
        summary = meter.summary()
        assert summary["hfu"] == pytest.approx(summary["mfu"], rel=1e-12), (
            "nothing ran beyond the model's needs"
        )


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_fp8_linears_under_checkpointing_are_recompute() -> None:
    """The control of the test above: with checkpointing the copy's count tells the rerun apart. The fp8
    Function saves its casts after its matmul, so torch's early stop reruns each layer's last matmul too,
    which the plain twin's ``mm`` (inputs saved before it runs) spares: the rerun is the fp8 step's own."""
    model, twin = twins("tensorwise")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    meter = train(model, BATCHES, real_step="off")
    diagnosis = next((d for d in meter.diagnostics() if d.id == "recompute_cost"), None)
    assert diagnosis is not None
    with_recompute = sum(reference_step_flops(model, batch) for batch in BATCHES[1:])
    without = sum(reference_step_flops(twin, batch) for batch in BATCHES[1:])
    assert diagnosis.value == pytest.approx(1 - without / with_recompute, rel=1e-9)
