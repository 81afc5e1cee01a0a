"""Diagnoses: what is costing a run MFU, each with the number that shows it and the fix.

The checks read what the meter already holds when its metrics are read (log time): the model's
shapes, the run's token and FLOP totals, the step timings, and where NVML is installed the GPU's
SM clock. Nothing here runs per step or waits for the GPU. Each diagnosis has a stable id, fires at
most once per run and can be silenced by id:

    meter = MFUMeter(model, silence_diagnostics=["matmul_shapes"])
    ...
    for diagnosis in meter.diagnostics():
        print(diagnosis)            # [padding_waste] padding is 31.0% of computed tokens ...

Costs are estimates: a step's time is taken to scale with the FLOPs it computes, so removing a
share ``s`` of the computed FLOPs (padding, recompute) or of the iteration time (input wait) would
raise MFU by ``mfu * s / (1 - s)``. Only torch is imported (NVML's ``pynvml`` lazily, when present).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed
from ._run_totals import RunTotals
from .flops.components import ATTENTION_SCORES, HEAD
from .flops.features import HARDWARE, MODEL
from .flops.unwrap import unwrap_model

logger = logging.getLogger("mfu_callbacks")

# -- ids -------------------------------------------------------------------------------------------
VOCAB_NOT_MULTIPLE_OF_64 = "vocab_not_multiple_of_64"
PADDING_WASTE = "padding_waste"
INPUT_BOUND = "input_bound"
STRAGGLERS = "stragglers"
RECOMPUTE_COST = "recompute_cost"
MATMUL_SHAPES = "matmul_shapes"
FP32_ADAPTERS = "fp32_adapters"
GPU_CLOCKS = "gpu_clocks"
DIAGNOSIS_IDS = (
    VOCAB_NOT_MULTIPLE_OF_64,
    PADDING_WASTE,
    INPUT_BOUND,
    STRAGGLERS,
    RECOMPUTE_COST,
    MATMUL_SHAPES,
    FP32_ADAPTERS,
    GPU_CLOCKS,
)

# -- thresholds ------------------------------------------------------------------------------------
VOCAB_MULTIPLE = 64  # LM-head tiles: Netflix's post-training framework saw a 3x slower head without it
PADDING_THRESHOLD = 0.10  # padding share of computed tokens over the run
INPUT_WAIT_THRESHOLD = 0.05  # input wait share of iteration time over the run
STRAGGLER_THRESHOLD = 0.10  # slowest rank's mean step time above the fastest's, relative
RECOMPUTE_THRESHOLD = 0.01  # recompute share of hardware FLOPs from which checkpointing counts as on
SHAPE_FLOPS_THRESHOLD = 0.01  # FLOP share of misaligned matmuls worth reporting (a 2-label classifier is not)
SM_CLOCK_THRESHOLD = 0.80  # SM clock over its maximum, below which a read counts as throttled
LOW_CLOCK_READS = 2  # throttled reads needed before reporting (one read can catch a transient dip)
MIN_TIMED_STEPS = 10  # measured steps before the timing checks (input wait, stragglers) judge a run
# Tensor cores want matmul sizes in multiples of 16 bytes of the operand dtype. FP32 matmuls
# (without TF32) do not run on tensor cores, so their shapes are not checked.
MATMUL_ALIGNMENT: Mapping[str, int] = {"bf16": 8, "fp16": 8, "fp8": 16, "tf32": 4}

# Step time of fp32 adapters over bf16 adapters on a bf16 base, measured on a GPU by
# benchmarks/bench_fp32_adapters.py. The diagnosis stays off until it is measured.
# H100 SXM, LoRA r=16 on all linear layers of a 1.1 B Llama-style model, batch 4 x 2048, bf16 base:
# 200.0 ms with fp32 adapters against 134.3 ms with bf16 adapters (benchmarks/RESULTS.md).
FP32_ADAPTER_SLOWDOWN: float | None = 1.489
FP32_ADAPTER_MIN_SLOWDOWN = 1.02  # below this the measured cost is within timing noise: never reported
_HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Diagnosis:
    """One cause of lost MFU, found in this run.

    id: stable, for silencing and for W&B summary keys. message: one line with the number that
    triggered it and the fix. value: that number; threshold: the limit it crossed. mfu_cost: how
    much higher MFU (a fraction, like ``mfu``) would be without the cause, an estimate; None where
    it cannot be estimated. flops_share: share of the step's model FLOPs concerned, where it applies.
    details: further numbers behind the message, by name.
    """

    id: str
    message: str
    value: float
    threshold: float
    mfu_cost: float | None = None
    flops_share: float | None = None
    details: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.id}] {self.message}"


def validate_ids(ids: Iterable[str]) -> tuple[str, ...]:
    """The ids as a tuple; ValueError naming the known ids when one is unknown."""
    if isinstance(ids, str):
        raise ValueError(f"silence_diagnostics must be a list of diagnosis ids, got the string {ids!r}")
    ids = tuple(ids)
    unknown = [item for item in ids if item not in DIAGNOSIS_IDS]
    if unknown:
        raise ValueError(f"unknown diagnosis id(s) {', '.join(map(repr, unknown))}: known ids are {', '.join(DIAGNOSIS_IDS)}")
    return ids


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int
    is_head: bool


@dataclass(frozen=True)
class _ModelShapes:
    """What the static checks need from the model, read once."""

    vocab_sizes: tuple[int, ...]  # input embedding rows and LM-head out-features
    linears: tuple[_Linear, ...]
    fp32_trainable_parameters: int
    half_frozen_parameters: int  # frozen weights stored in bf16/fp16
    frozen_parameters: int


@dataclass(frozen=True)
class _FlopSplit:
    """The run's FLOPs (this rank's features) and the shares of its hardware FLOPs that are waste."""

    model_flops: float
    breakdown: Mapping[str, float]
    padding_share: float  # of hardware FLOPs: computed on padding tokens
    recompute_share: float  # of hardware FLOPs: rerun by activation checkpointing


class Diagnostics:
    """The checks of one run; ``review`` runs them at each read of the meter, ``fired`` lists what fired."""

    def __init__(self, silence: Iterable[str] = ()) -> None:
        self.silenced = frozenset(validate_ids(silence))
        self.fired: list[Diagnosis] = []
        self._run = RunTotals()
        self._shapes: _ModelShapes | None = None
        self._clocks = _NvmlClocks()
        self._clock_reads = 0
        self._low_clock_ratios: list[float] = []
        self._low_clock_reasons: set[str] = set()
        self._max_clock_mhz = 0.0

    def review(
        self,
        run: RunTotals,
        *,
        model: nn.Module,
        engine: Any | None,
        run_features: torch.Tensor | None,
        peak_flops: float | None,
        compute_dtype: str | None,
        autocast_in_training: bool | None = None,
    ) -> list[Diagnosis]:
        """Run every check not fired or silenced on the run read so far; returns the new diagnoses.

        ``run_features``: this rank's summed features of every step read so far (the engine turns
        them into FLOPs); ``autocast_in_training``: whether autocast was on at the first forward
        (None when no forward was seen).
        """
        self._run = run
        split = _split_flops(engine, run_features)
        new: list[Diagnosis] = []
        checks = (
            (VOCAB_NOT_MULTIPLE_OF_64, lambda: self._vocab(model, split)),
            (PADDING_WASTE, lambda: self._padding(split, peak_flops)),
            (INPUT_BOUND, lambda: self._input_bound(peak_flops)),
            (STRAGGLERS, lambda: self._stragglers(peak_flops)),
            (RECOMPUTE_COST, lambda: self._recompute(split, peak_flops)),
            (MATMUL_SHAPES, lambda: self._matmul_shapes(model, split, compute_dtype)),
            (FP32_ADAPTERS, lambda: self._fp32_adapters(model, split, compute_dtype, autocast_in_training, peak_flops)),
            (GPU_CLOCKS, lambda: self._gpu_clocks(peak_flops)),
        )
        done = {diagnosis.id for diagnosis in self.fired} | self.silenced
        for diagnosis_id, check in checks:
            if diagnosis_id in done:
                continue
            try:
                diagnosis = check()
            except Exception:  # noqa: BLE001 - a failed check must not cost the run its metrics
                logger.debug("mfu_callbacks: the %s check failed", diagnosis_id, exc_info=True)
                continue
            if diagnosis is not None:
                new.append(diagnosis)
        self.fired.extend(new)
        if distributed.rank() == 0:
            for diagnosis in new:
                logger.warning("mfu_callbacks %s", diagnosis)
        return new

    # -- the checks -------------------------------------------------------------------------------
    def _model_shapes(self, model: nn.Module) -> _ModelShapes:
        if self._shapes is None:
            self._shapes = _read_shapes(model)
        return self._shapes

    def _vocab(self, model: nn.Module, split: _FlopSplit | None) -> Diagnosis | None:
        """A vocabulary that is not a multiple of 64 slows the LM head's matmul; cost: the head's FLOP share."""
        misaligned = [size for size in self._model_shapes(model).vocab_sizes if size % VOCAB_MULTIPLE]
        if not misaligned or split is None or not split.model_flops:
            return None
        head_share = split.breakdown.get(HEAD, 0.0) / split.model_flops
        if head_share <= 0:
            return None  # no head matmul over the vocabulary: an embedding lookup costs no FLOPs
        vocab = misaligned[0]
        padded = _round_up(vocab, VOCAB_MULTIPLE)
        return Diagnosis(
            VOCAB_NOT_MULTIPLE_OF_64,
            f"vocabulary size {vocab:,} is not a multiple of {VOCAB_MULTIPLE}: the LM head, {head_share:.1%} of "
            f"the step's FLOPs, runs on misaligned tensor-core tiles (reported up to 3x slower); pad it to "
            f"{padded:,} (model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of={VOCAB_MULTIPLE}))",
            value=float(vocab),
            threshold=float(VOCAB_MULTIPLE),
            flops_share=head_share,
            details={"padded_vocab_size": float(padded)},
        )

    def _padding(self, split: _FlopSplit | None, peak_flops: float | None) -> Diagnosis | None:
        """Padding tokens are computed and thrown away; packing sequences removes them."""
        run = self._run
        if run.padded_tokens <= 0:
            return None
        padding = 1.0 - run.tokens / run.padded_tokens
        if padding <= PADDING_THRESHOLD:
            return None
        # Attention is quadratic in length, so the FLOP share of padding differs from its token share.
        wasted = split.padding_share if split is not None else padding
        mfu = run.utilization(run.model_flops, peak_flops)
        cost = _recovered(mfu, wasted)
        return Diagnosis(
            PADDING_WASTE,
            f"padding is {padding:.1%} of computed tokens ({wasted:.1%} of computed FLOPs){_cost_text(mfu, cost)}; "
            "pack sequences: HF Trainer DataCollatorWithFlattening (with flash attention), TRL "
            "SFTConfig(packing=True), Lightning or a plain loop: pack in the dataset or collate_fn",
            value=padding,
            threshold=PADDING_THRESHOLD,
            mfu_cost=cost,
            details={"padding_flops_share": wasted},
        )

    def _input_bound(self, peak_flops: float | None) -> Diagnosis | None:
        """Time the GPU waits for the next batch is time it computes nothing."""
        run = self._run
        iteration = run.step_seconds + run.input_wait_seconds
        if run.steps < MIN_TIMED_STEPS or iteration <= 0:
            return None
        waiting = run.input_wait_seconds / iteration
        if waiting <= INPUT_WAIT_THRESHOLD:
            return None
        mfu = run.utilization(run.model_flops, peak_flops)
        cost = _recovered(mfu, waiting)
        return Diagnosis(
            INPUT_BOUND,
            f"waiting for input took {waiting:.1%} of iteration time{_cost_text(mfu, cost)}; feed the GPU faster: "
            "DataLoader num_workers (a few per GPU), pin_memory=True, persistent_workers=True, prefetch_factor=2-4 "
            "(HF TrainingArguments: dataloader_num_workers, dataloader_pin_memory, dataloader_persistent_workers, "
            "dataloader_prefetch_factor), and tokenize ahead of time",
            value=waiting,
            threshold=INPUT_WAIT_THRESHOLD,
            mfu_cost=cost,
        )

    def _stragglers(self, peak_flops: float | None) -> Diagnosis | None:
        """Every rank waits for the slowest one at each gradient reduction."""
        run = self._run
        if run.world_size < 2 or run.steps < MIN_TIMED_STEPS or run.fastest_rank_seconds <= 0:
            return None
        slowest, fastest = run.slowest_rank_seconds / run.steps, run.fastest_rank_seconds / run.steps
        excess = slowest / fastest - 1.0
        if excess <= STRAGGLER_THRESHOLD:
            return None
        mfu = run.utilization(run.model_flops, peak_flops)
        cost = mfu * excess if mfu is not None else None  # every rank at the fastest rank's pace
        cost_text = f": MFU would be up to {cost:.3f} higher ({mfu:.3f} now)" if cost is not None else ""
        return Diagnosis(
            STRAGGLERS,
            f"the slowest rank's mean step ({slowest:.3f} s) is {excess:.1%} above the fastest's ({fastest:.3f} s)"
            f"{cost_text}; the others wait for it: look for uneven batches (sort or bucket by length), a throttled "
            "or shared GPU, or host contention on its node",
            value=excess,
            threshold=STRAGGLER_THRESHOLD,
            mfu_cost=cost,
            details={"slowest_step_seconds": slowest, "fastest_step_seconds": fastest},
        )

    def _recompute(self, split: _FlopSplit | None, peak_flops: float | None) -> Diagnosis | None:
        """Activation checkpointing reruns forward passes in the backward: HFU counts them, MFU does not."""
        if split is None or split.recompute_share < RECOMPUTE_THRESHOLD:
            return None
        run = self._run
        mfu = run.utilization(run.model_flops, peak_flops)
        hfu = run.utilization(run.hardware_flops, peak_flops)
        cost = _recovered(mfu, split.recompute_share)
        details = {"recompute_flops_share": split.recompute_share}
        gap = ""
        if mfu is not None and hfu is not None:
            recompute_gap = hfu * split.recompute_share  # the recompute FLOPs at the run's pace
            details.update(hfu=hfu, mfu=mfu, hfu_mfu_gap_from_recompute=recompute_gap)
            gap = f": {recompute_gap:.3f} of the HFU - MFU gap ({hfu:.3f} vs {mfu:.3f}); without it MFU would be about {mfu + cost:.3f}"
        return Diagnosis(
            RECOMPUTE_COST,
            f"gradient checkpointing reruns {split.recompute_share:.1%} of the computed FLOPs{gap}; if memory allows, "
            "turn it off, or checkpoint fewer layers (selective checkpointing), or trade it for a smaller micro-batch",
            value=split.recompute_share,
            threshold=RECOMPUTE_THRESHOLD,
            mfu_cost=cost,
            details=details,
        )

    def _matmul_shapes(self, model: nn.Module, split: _FlopSplit | None, compute_dtype: str | None) -> Diagnosis | None:
        """Matmul sizes off the tensor cores' multiple run on padded or slower kernels.

        A linear layer's FLOPs per token are proportional to its weight's size, so the share of the
        step's FLOPs a layer carries is its share of all linear weights times the share of FLOPs in
        linear layers (everything but attention scores).
        """
        alignment = MATMUL_ALIGNMENT.get(compute_dtype or "")
        if alignment is None or split is None or not split.model_flops:
            return None
        linears = self._model_shapes(model).linears
        total = sum(linear.in_features * linear.out_features for linear in linears)
        misaligned: list[tuple[_Linear, list[int]]] = []
        for linear in linears:
            # The LM head's vocabulary dimension belongs to the vocabulary check.
            dims = [linear.in_features] if linear.is_head else [linear.in_features, linear.out_features]
            off = [dim for dim in dims if dim % alignment]
            if off:
                misaligned.append((linear, off))
        if not misaligned or not total:
            return None
        linear_share = 1.0 - split.breakdown.get(ATTENTION_SCORES, 0.0) / split.model_flops
        weight = sum(linear.in_features * linear.out_features for linear, _ in misaligned)
        share = weight / total * linear_share
        if share < SHAPE_FLOPS_THRESHOLD:
            return None
        sizes = sorted({dim for _, off in misaligned for dim in off})
        example, _ = misaligned[0]
        fixes = ", ".join(f"{size} -> {_round_up(size, alignment)}" for size in sizes[:4])
        return Diagnosis(
            MATMUL_SHAPES,
            f"matmul sizes {', '.join(map(str, sizes[:6]))} are not multiples of {alignment} for {compute_dtype}: "
            f"{len(misaligned)} layers (e.g. {example.name}, {example.in_features}x{example.out_features}) carry "
            f"{share:.1%} of the step's FLOPs on slower tensor-core kernels; use multiples of {alignment} for hidden, "
            f"intermediate and adapter-rank sizes ({fixes})",
            value=share,
            threshold=SHAPE_FLOPS_THRESHOLD,
            flops_share=share,
            details={"alignment": float(alignment), "misaligned_layers": float(len(misaligned))},
        )

    def _fp32_adapters(
        self,
        model: nn.Module,
        split: _FlopSplit | None,
        compute_dtype: str | None,
        autocast_in_training: bool | None,
        peak_flops: float | None,
    ) -> Diagnosis | None:
        """Trainable weights in fp32 on a bf16/fp16 base run their matmuls in fp32 (without autocast)."""
        slowdown = FP32_ADAPTER_SLOWDOWN
        if slowdown is None or slowdown < FP32_ADAPTER_MIN_SLOWDOWN:
            return None  # shipped only with a cost measured on a GPU (benchmarks/bench_fp32_adapters.py)
        if compute_dtype not in ("bf16", "fp16") or autocast_in_training:
            return None  # under autocast the adapters' matmuls run in half precision anyway
        shapes = self._model_shapes(model)
        if not shapes.fp32_trainable_parameters or shapes.half_frozen_parameters * 2 <= shapes.frozen_parameters:
            return None  # no fp32 trainables, or the base itself is not kept in half precision
        run = self._run
        mfu = run.utilization(run.model_flops, peak_flops)
        cost = mfu * (slowdown - 1.0) if mfu is not None else None  # the step runs slowdown x faster in bf16
        adapters_share = None
        if split is not None and split.model_flops:
            adapters_share = split.breakdown.get("adapters", 0.0) / split.model_flops
        cost_text = f" (MFU {mfu:.3f} -> about {mfu + cost:.3f})" if cost is not None else ""
        return Diagnosis(
            FP32_ADAPTERS,
            f"{shapes.fp32_trainable_parameters:,} trainable parameters are fp32 while the base computes in "
            f"{compute_dtype}: measured {slowdown:.2f}x step time (LoRA r=16 on a 1B Llama, H100){cost_text}; "
            f"keep them in {compute_dtype} (PEFT: get_peft_model(..., autocast_adapter_dtype=False)) or train under "
            "autocast",
            value=slowdown,
            threshold=FP32_ADAPTER_MIN_SLOWDOWN,
            mfu_cost=cost,
            flops_share=adapters_share,
            details={"fp32_trainable_parameters": float(shapes.fp32_trainable_parameters)},
        )

    def sample_clock(self, device: torch.device) -> None:
        """Read the SM clock now: call it at log time before waiting for the GPU, while the step's work still runs."""
        if device.type != "cuda" or GPU_CLOCKS in self.silenced or any(d.id == GPU_CLOCKS for d in self.fired):
            return
        reading = self._clocks.read(device)
        if reading is None:
            return
        current, maximum, reasons = reading
        self._clock_reads += 1
        self._max_clock_mhz = maximum
        ratio = current / maximum
        if ratio < SM_CLOCK_THRESHOLD:
            self._low_clock_ratios.append(ratio)
            self._low_clock_reasons.update(reasons)

    def _gpu_clocks(self, peak_flops: float | None) -> Diagnosis | None:
        """An SM clock well below its maximum (thermal or power limits) slows every matmul alike."""
        if len(self._low_clock_ratios) < LOW_CLOCK_READS:
            return None
        mean_ratio = sum(self._low_clock_ratios) / len(self._low_clock_ratios)
        run = self._run
        mfu = run.utilization(run.model_flops, peak_flops)
        cost = mfu * (1.0 / mean_ratio - 1.0) if mfu is not None else None  # matmul time scales with 1 / clock
        why = f" ({', '.join(sorted(self._low_clock_reasons))})" if self._low_clock_reasons else ""
        cost_text = f": MFU would be up to {cost:.3f} higher at full clock" if cost is not None else ""
        return Diagnosis(
            GPU_CLOCKS,
            f"SM clock averaged {mean_ratio:.0%} of its {self._max_clock_mhz:,.0f} MHz maximum at {len(self._low_clock_ratios)} "
            f"of {self._clock_reads} log-time reads{why}{cost_text}; check cooling, the power limit and clock settings "
            "(nvidia-smi -q -d PERFORMANCE,CLOCK)",
            value=mean_ratio,
            threshold=SM_CLOCK_THRESHOLD,
            mfu_cost=cost,
            details={"sm_clock_mhz": mean_ratio * self._max_clock_mhz, "max_sm_clock_mhz": self._max_clock_mhz},
        )


# -- helpers ---------------------------------------------------------------------------------------
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _recovered(mfu: float | None, wasted_share: float) -> float | None:
    """MFU gained if a share of the time went away: the same FLOPs in (1 - share) of the time."""
    if mfu is None or wasted_share >= 1.0:
        return None
    return mfu * wasted_share / (1.0 - wasted_share)


def _cost_text(mfu: float | None, cost: float | None) -> str:
    if mfu is None or cost is None:
        return ""
    return f": MFU {mfu:.3f} would be about {mfu + cost:.3f} without it"


def _split_flops(engine: Any | None, features: torch.Tensor | None) -> _FlopSplit | None:
    """Evaluate the engine's formula on the run's features, and again with the waste taken out.

    The hardware row of the features holds the computed tokens, the model row the real ones. The
    hardware formula on real tokens is the run without padding; the model formula (no recompute)
    on computed tokens is the run without activation checkpointing.
    """
    if engine is None or features is None:
        return None
    real, computed = features[MODEL], features[HARDWARE]
    run = engine.evaluate(features)
    if run.hardware_flops <= 0:
        return None
    without_padding = engine.evaluate(torch.stack([real, real])).hardware_flops
    without_recompute = engine.evaluate(torch.stack([computed, computed])).model_flops
    return _FlopSplit(
        model_flops=float(run.model_flops),
        breakdown={name: float(value) for name, value in run.breakdown.items()},
        padding_share=max(0.0, 1.0 - without_padding / run.hardware_flops),
        recompute_share=max(0.0, 1.0 - without_recompute / run.hardware_flops),
    )


def _call(model: nn.Module, method: str) -> Any:
    function = getattr(model, method, None)
    if not callable(function):
        return None
    try:
        return function()
    except Exception:  # noqa: BLE001 - models that declare the method without supporting it
        return None


def _rows(module: Any) -> int | None:
    """Rows of an embedding or out-features of a linear layer, whatever wraps it."""
    for attribute in ("num_embeddings", "out_features"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _read_shapes(model: nn.Module) -> _ModelShapes:
    """Vocabulary sizes, linear layers and trainable-weight dtypes of the model (read once)."""
    base = unwrap_model(model)
    embeddings, head = _call(base, "get_input_embeddings"), _call(base, "get_output_embeddings")
    if embeddings is None:
        tables = [module for module in base.modules() if isinstance(module, nn.Embedding)]
        embeddings = max(tables, key=lambda table: table.num_embeddings, default=None)
    if head is None:
        head = next((module for name, module in base.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"), None)
    vocab_sizes = tuple(dict.fromkeys(size for size in (_rows(embeddings), _rows(head)) if size))
    head_modules = {id(module) for module in head.modules()} if isinstance(head, nn.Module) else set()
    linears = []
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            in_features, out_features = module.weight.shape  # transformers' GPT-2 Conv1D stores (in, out)
        else:
            continue
        linears.append(_Linear(name, int(in_features), int(out_features), id(module) in head_modules))
    fp32_trainable = half_frozen = frozen = 0
    for parameter in base.parameters():
        if not parameter.is_floating_point():
            continue
        if parameter.requires_grad:
            fp32_trainable += parameter.numel() if parameter.dtype == torch.float32 else 0
        else:
            frozen += parameter.numel()
            half_frozen += parameter.numel() if parameter.dtype in _HALF_DTYPES else 0
    return _ModelShapes(vocab_sizes, tuple(linears), fp32_trainable, half_frozen, frozen)


# -- NVML ------------------------------------------------------------------------------------------
# Bits of nvmlDeviceGetCurrentClocksEventReasons (formerly ...ThrottleReasons), stable across versions.
_GPU_IDLE = 0x1
_CLOCK_REASONS: Mapping[int, str] = {
    0x2: "application clock setting",
    0x4: "power cap",
    0x8: "hardware slowdown",
    0x20: "thermal slowdown (software)",
    0x40: "thermal slowdown (hardware)",
    0x80: "power brake",
}


def _nvml_index(device: torch.device) -> int:
    """NVML numbers all GPUs of the host; CUDA numbers the visible ones (CUDA_VISIBLE_DEVICES)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


class _NvmlClocks:
    """The SM clock of one GPU through NVML (``nvidia-ml-py``, imported on first use); None when unavailable."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._unavailable = False

    def read(self, device: torch.device) -> tuple[float, float, list[str]] | None:
        """(current MHz, maximum MHz, reasons the clock is held down); None when NVML is missing or the GPU idles."""
        if self._unavailable:
            return None
        try:
            import pynvml

            if self._handle is None:
                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
            current = pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
            maximum = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
            get_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
            )
            mask = int(get_reasons(self._handle)) if get_reasons is not None else 0
        except Exception:  # noqa: BLE001 - no pynvml, no driver, or a GPU NVML cannot see: skip the check
            self._unavailable = True
            return None
        if mask & _GPU_IDLE or not maximum:
            return None  # an idle GPU clocks down: not a reading taken while training
        return float(current), float(maximum), [name for bit, name in _CLOCK_REASONS.items() if mask & bit]
