"""What a training step of a model should take on this device, from timing its pieces one by one.

``examine`` reads the step's work from a meta-device forward and backward (``step_trace.py``): each
distinct GEMM shape with its count per step, each attention call, and the memory traffic of
everything else. It then times each distinct GEMM and attention shape here (``timing.py``) and adds
them up, the step's compute floor; model FLOPs over the floor and the peak is the highest MFU the
step can reach. The predicted step adds what is not a matmul:

- matmuls, attention: measured (each distinct shape timed, times its count);
- optimizer: measured (one AdamW step over the trainable parameters' shapes, scaled by the
  parameter count beyond the first 2^28);
- other ops (norms, activations, residual adds, casts, the loss): measured, each distinct op
  replayed on made-up data of the traced layout; an op that cannot be replayed (it needs
  particular values) is modelled: its bytes read and written over the measured copy bandwidth,
  and no less than a measured tiny kernel.

Not modelled: gaps where the host launches kernels slower than the GPU runs them, and the
allocator; both show as measured time above the prediction.

For each GEMM shape with a size off a multiple of 64 (other than the token count), the padded
shapes are timed too: what padding would buy per step.

Everything is timed in ``rounds`` passes, a padded shape beside its original in each: a figure is
the median of its rounds, and the spread (slowest round minus fastest) is shown beside it. On a
busy machine one pass can be ten times another; padding is advised only when it saved time in every
round and its smallest saving exceeds the spread of the original shape's own time.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .._window import utilization
from .budget import check_fits
from .step_trace import AttentionShape, MatmulShape, StepTrace, trace_step
from .timing import (
    Timer,
    copy_bandwidth,
    time_attention,
    time_matmul,
    time_op,
    time_optimizer,
    tiny_kernel_seconds,
)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}
MIXED_PRECISION = (
    "bf16",
    "fp16",
)  # fp32 weights under autocast (HF Trainer bf16=True, Lightning "bf16-mixed")
PAD_MULTIPLES = (8, 64)
MIN_GAIN = 0.03  # of a shape's time: a padded shape must save more than timing noise to be reported
_WRAPPERS = frozenset(
    {"default", "base_layer"}
)  # PEFT's parts of a module path (adapter name, wrapped layer)


def spread(samples: Sequence[float]) -> float:
    """Slowest round minus fastest: how far one timing of this machine can be from another."""
    return max(samples) - min(samples) if samples else 0.0


@dataclass(frozen=True)
class TimedMatmul:
    shape: MatmulShape
    count: int  # per step
    samples: tuple[float, ...]  # seconds of one call, one per round
    layers: str  # which layers run it and how: "q_proj fwd, o_proj dgrad"
    # Padded shape -> seconds of one call per round, for a shape with a size off a multiple of 64.
    padded_samples: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """One call: the median of the rounds."""
        return statistics.median(self.samples)

    @property
    def padded(self) -> dict[str, float]:
        return {name: statistics.median(samples) for name, samples in self.padded_samples.items()}

    @property
    def step_seconds(self) -> float:
        return self.seconds * self.count

    @property
    def step_spread(self) -> float:
        """The spread of this shape's time per step over the rounds."""
        return spread(self.samples) * self.count

    @property
    def padding_gain(self) -> tuple[str, float] | None:
        """The padded shape that saves the most time per step (median over rounds), and how many
        seconds; None unless it saved time in every round, its smallest saving exceeds the spread of
        the shape's own time, and the median saving is more than ``MIN_GAIN`` of it."""
        best = min(self.padded.items(), key=lambda item: item[1], default=None)
        if best is None or best[1] >= self.seconds * (1.0 - MIN_GAIN):
            return None
        savings = [
            (original - padded) * self.count
            for original, padded in zip(self.samples, self.padded_samples[best[0]])
        ]
        if min(savings) <= self.step_spread:
            return None
        return best[0], (self.seconds - best[1]) * self.count


@dataclass(frozen=True)
class TimedAttention:
    shape: AttentionShape
    count: int
    samples: tuple[float, ...]  # seconds of one call, one per round
    segments: int  # documents in a row (a packed row's block-diagonal mask)

    @property
    def seconds(self) -> float:
        return statistics.median(self.samples)

    @property
    def step_seconds(self) -> float:
        return self.seconds * self.count


@dataclass(frozen=True)
class Examination:
    """A step's pieces timed on one device, and what they add up to."""

    device: str
    dtype: str
    tokens: int
    matmuls: tuple[TimedMatmul, ...]
    attention: tuple[TimedAttention, ...]
    other_bytes: int
    other_ops: int
    other_seconds: float  # replayed ops measured, the rest modelled
    other_modelled_seconds: float  # of which modelled
    other_modelled_ops: int
    copy_bandwidth: float  # bytes/s, measured
    tiny_kernel_seconds: float  # measured
    optimizer_seconds: float  # measured (scaled beyond the parameters timed)
    optimizer_parameters: int
    optimizer_parameters_timed: int
    model_flops: float | None = None
    peak_flops: float | None = None
    predicted_rounds: tuple[float, ...] = ()  # the predicted step of each round alone

    @property
    def rounds(self) -> int:
        return len(self.predicted_rounds)

    @property
    def floor_rounds(self) -> tuple[float, ...]:
        """The compute floor of each round alone."""
        timed: list[TimedMatmul | TimedAttention] = [*self.matmuls, *self.attention]
        return tuple(sum(item.samples[index] * item.count for item in timed) for index in range(self.rounds))

    @property
    def matmul_seconds(self) -> float:
        return sum(item.step_seconds for item in self.matmuls)

    @property
    def attention_seconds(self) -> float:
        return sum(item.step_seconds for item in self.attention)

    @property
    def floor_seconds(self) -> float:
        """The step's compute floor: every matmul and attention call at its timed speed."""
        return self.matmul_seconds + self.attention_seconds

    @property
    def predicted_seconds(self) -> float:
        return self.floor_seconds + self.other_seconds + self.optimizer_seconds

    def mfu_at(self, seconds: float) -> float | None:
        if not self.model_flops or not self.peak_flops or seconds <= 0:
            return None
        return utilization(self.model_flops, seconds, 1, self.peak_flops)  # one GPU's step

    def to_dict(self) -> dict[str, Any]:
        parts = {
            "matmuls": (self.matmul_seconds, "measured"),
            "attention": (self.attention_seconds, "measured"),
            "optimizer": (self.optimizer_seconds, "measured"),
            "other_ops": (self.other_seconds - self.other_modelled_seconds, "measured"),
            "other_ops_modelled": (self.other_modelled_seconds, "modelled"),
        }
        return {
            "device": self.device,
            "dtype": self.dtype,
            "tokens_per_step": self.tokens,
            "model_flops_per_step": self.model_flops,
            "peak_tflops": self.peak_flops / 1e12 if self.peak_flops else None,
            "rounds": self.rounds,
            "floor_seconds": self.floor_seconds,
            "floor_spread_seconds": spread(self.floor_rounds),
            "mfu_ceiling": self.mfu_at(self.floor_seconds),
            "predicted_seconds": self.predicted_seconds,
            "predicted_spread_seconds": spread(self.predicted_rounds),
            "predicted_mfu": self.mfu_at(self.predicted_seconds),
            "parts": {name: {"seconds": value, "how": how} for name, (value, how) in parts.items()},
            "matmuls": [
                {
                    **asdict(item.shape),
                    "flops": item.shape.flops,
                    "count": item.count,
                    "seconds": item.seconds,
                    "spread_seconds": spread(item.samples),
                    "tflops": item.shape.flops / item.seconds / 1e12 if item.seconds > 0 else None,
                    "layers": item.layers,
                    "padded_seconds": item.padded,
                    "padding_gain_seconds": item.padding_gain[1] if item.padding_gain else 0.0,
                    "pad_to": item.padding_gain[0] if item.padding_gain else None,
                }
                for item in self.matmuls
            ],
            "attention": [
                {
                    **asdict(item.shape),
                    "flops": item.shape.flops,
                    "count": item.count,
                    "seconds": item.seconds,
                    "spread_seconds": spread(item.samples),
                    "segments": item.segments,
                }
                for item in self.attention
            ],
            "other_ops": {
                "ops": self.other_ops,
                "modelled_ops": self.other_modelled_ops,
                "bytes": self.other_bytes,
                "copy_bandwidth_gb_per_s": self.copy_bandwidth / 1e9,
                "tiny_kernel_seconds": self.tiny_kernel_seconds,
            },
            "optimizer": {
                "parameters": self.optimizer_parameters,
                "parameters_timed": self.optimizer_parameters_timed,
            },
        }


def meta_batch(rows: int, length: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Full rows, or (``packed``) one row of ``rows`` documents marked by restarting ``position_ids``."""
    if not packed:
        ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": ids}
    ids = torch.zeros(1, rows * length, dtype=torch.long, device="meta")
    return {"input_ids": ids, "position_ids": torch.zeros_like(ids), "labels": ids}


def trace(model: nn.Module, batch_size: int, seq_len: int, dtype: str, packed: bool = False) -> StepTrace:
    """The step's work: ``batch_size`` full rows of ``seq_len`` tokens on a meta-device model, or
    those rows packed into one (the attention calls are then whatever the model makes of a packed row)."""
    autocast = TORCH_DTYPES[dtype] if dtype in MIXED_PRECISION else None
    return trace_step(model, meta_batch(batch_size, seq_len, packed), autocast=autocast)


def examine(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str,
    device: torch.device,
    packed: bool = False,
    repeats: int = 10,
    rounds: int = 3,
    model_flops: float | None = None,
    peak_flops: float | None = None,
) -> Examination:
    """Time the step of a meta-device ``model`` on ``device``, piece by piece.

    ``packed``: the rows are one row of ``batch_size`` documents (restarting position_ids). Attention
    is timed as the model calls it on such a row: transformers' SDPA path, for one, attends causally
    over the whole row (no mask); a mask, where the model builds one, is timed as a block-diagonal one.
    """
    step = trace(model, batch_size, seq_len, dtype, packed)
    torch_dtype = TORCH_DTYPES[dtype]
    shapes = [param.shape for param in model.parameters() if param.requires_grad]
    check_fits(step, shapes, torch_dtype, device)  # before anything is allocated
    segments = {shape: batch_size if packed and shape.masked else 1 for shape in step.attention}
    timing = _StepTiming(step, shapes, torch_dtype, Timer(device, repeats), batch_size * seq_len, segments)
    # Round after round, every piece once per round: a slow moment of the machine hits one round of
    # every piece, not every round of one piece.
    for _ in range(max(1, rounds)):
        with _matmul_precision(dtype):
            timing.time_matmuls()
            timing.time_attention()
        timing.time_the_rest()
    return timing.examination(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        dtype=dtype,
        layers=_layer_names(model),
        model_flops=model_flops,
        peak_flops=peak_flops,
    )


@dataclass
class _StepTiming:
    """The samples of every piece of one traced step, one per round, as the rounds time them."""

    step: StepTrace
    parameter_shapes: list[torch.Size]  # of the trainable parameters: what the optimizer steps
    torch_dtype: torch.dtype
    timer: Timer
    tokens: int
    segments: dict[AttentionShape, int]  # documents per attention call
    matmuls: dict[MatmulShape, list[float]] = field(init=False)
    padded: dict[MatmulShape, dict[str, list[float]]] = field(init=False)
    attention: dict[AttentionShape, list[float]] = field(init=False)
    bandwidths: list[float] = field(default_factory=list)
    tinies: list[float] = field(default_factory=list)
    optimizers: list[float] = field(default_factory=list)
    replayed: list[float] = field(default_factory=list)  # seconds of the other ops that replay
    replayable: dict[Any, bool] = field(default_factory=dict)
    optimizer_timed: int = 0  # parameters the optimizer step was timed over

    def __post_init__(self) -> None:
        self.matmuls = {shape: [] for shape in self.step.matmuls}
        self.padded = {shape: {} for shape in self.step.matmuls}
        self.attention = {shape: [] for shape in self.step.attention}

    @property
    def parameters(self) -> int:
        return sum(size.numel() for size in self.parameter_shapes)

    def time_matmuls(self) -> None:
        """Each distinct GEMM once, each of its padded shapes beside it."""
        for shape in sorted(self.step.matmuls):
            self.matmuls[shape].append(time_matmul(shape, self.torch_dtype, self.timer))
            for multiple in PAD_MULTIPLES:
                wider = _padded(shape, multiple, self.tokens)
                if wider is not None:
                    samples = self.padded[shape].setdefault(_describe(wider), [])
                    if len(samples) < len(self.matmuls[shape]):
                        samples.append(time_matmul(wider, self.torch_dtype, self.timer))

    def time_attention(self) -> None:
        for called in sorted(self.step.attention):
            self.attention[called].append(
                time_attention(called, self.torch_dtype, self.timer, self.segments[called])
            )

    def time_the_rest(self) -> None:
        """The copy bandwidth and a tiny kernel (what models the ops that cannot replay), the other ops
        that can, and the optimizer step."""
        self.bandwidths.append(copy_bandwidth(self.timer))
        self.tinies.append(tiny_kernel_seconds(self.timer))
        seconds = 0.0
        for call, count in self.step.other.items():
            measured = time_op(call, self.timer) if self.replayable.get(call, True) else None
            self.replayable[call] = measured is not None
            seconds += (measured or 0.0) * count
        self.replayed.append(seconds)
        optimizer, self.optimizer_timed = time_optimizer(self.parameter_shapes, self.timer)
        timed = self.optimizer_timed
        self.optimizers.append(optimizer * self.parameters / timed if timed else 0.0)

    def examination(
        self,
        *,
        device: str,
        dtype: str,
        layers: dict[tuple[int, int], list[str]],
        model_flops: float | None,
        peak_flops: float | None,
    ) -> Examination:
        """The figures of every piece over the rounds, and the step they predict round by round."""
        step, tokens = self.step, self.tokens
        bandwidth, tiny = statistics.median(self.bandwidths), statistics.median(self.tinies)
        # What cannot be replayed is modelled once, from the medians: its bytes over the copy bandwidth.
        unreplayed = {call: count for call, count in step.other.items() if not self.replayable[call]}
        modelled = sum(max(call.moved / bandwidth, tiny) * count for call, count in unreplayed.items())
        timed_matmuls = tuple(
            TimedMatmul(
                shape,
                step.matmuls[shape],
                tuple(self.matmuls[shape]),
                _label(shape, tokens, layers),
                {name: tuple(samples) for name, samples in self.padded[shape].items()},
            )
            for shape in sorted(step.matmuls)
        )
        timed_attention = tuple(
            TimedAttention(shape, step.attention[shape], tuple(self.attention[shape]), self.segments[shape])
            for shape in sorted(step.attention)
        )
        pieces: list[TimedMatmul | TimedAttention] = [*timed_matmuls, *timed_attention]
        predicted_rounds = tuple(
            sum(item.samples[index] * item.count for item in pieces)
            + self.replayed[index]
            + modelled
            + self.optimizers[index]
            for index in range(len(self.replayed))
        )
        return Examination(
            device=device,
            dtype=dtype,
            tokens=tokens,
            matmuls=timed_matmuls,
            attention=timed_attention,
            other_bytes=step.other_bytes,
            other_ops=step.other_ops,
            other_seconds=statistics.median(self.replayed) + modelled,
            other_modelled_seconds=modelled,
            other_modelled_ops=sum(unreplayed.values()),
            copy_bandwidth=bandwidth,
            tiny_kernel_seconds=tiny,
            optimizer_seconds=statistics.median(self.optimizers),
            optimizer_parameters=self.parameters,
            optimizer_parameters_timed=self.optimizer_timed,
            model_flops=model_flops,
            peak_flops=peak_flops,
            predicted_rounds=predicted_rounds,
        )


class _matmul_precision:
    """TF32 on for "tf32", off for "fp32", as the dtype says; restored after."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        if self.dtype in ("tf32", "fp32"):
            torch.backends.cuda.matmul.allow_tf32 = self.dtype == "tf32"

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _padded(shape: MatmulShape, multiple: int, tokens: int) -> MatmulShape | None:
    """The shape with its sizes other than the token count rounded up to ``multiple``; None if none changes."""
    sizes = {name: getattr(shape, name) for name in ("m", "k", "n")}
    wider = {
        name: -(-size // multiple) * multiple if size != tokens and size % 64 else size
        for name, size in sizes.items()
    }
    return replace(shape, **wider) if wider != sizes else None


def _describe(shape: MatmulShape) -> str:
    batch = f"{shape.batch}x" if shape.batch > 1 else ""
    return f"{batch}{shape.m}x{shape.k}x{shape.n}"


def _layer_names(model: nn.Module) -> dict[tuple[int, int], list[str]]:
    """Leaf names of the linear layers, by (in_features, out_features)."""
    names: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = [part for part in name.split(".") if part not in _WRAPPERS]
            leaf = (
                ".".join(parts[-2:])
                if parts and parts[-1].startswith("lora_")
                else parts[-1]
                if parts
                else name
            )
            known = names.setdefault((module.in_features, module.out_features), [])
            if leaf not in known:
                known.append(leaf)
    return names


def _label(shape: MatmulShape, tokens: int, layers: dict[tuple[int, int], list[str]]) -> str:
    """Which linear layers run this GEMM: forward (fwd), input gradient (dgrad) or weight gradient (wgrad)."""
    if shape.batch > 1:
        return "batched matmul"
    found: list[str] = []
    roles: Sequence[tuple[str, bool, tuple[int, int]]] = (
        ("fwd", shape.m == tokens, (shape.k, shape.n)),
        ("dgrad", shape.m == tokens, (shape.n, shape.k)),
        ("wgrad", shape.k == tokens, (shape.n, shape.m)),
    )
    for role, fits, key in roles:
        if fits:
            found.extend(f"{name} {role}" for name in layers.get(key, []))
    return ", ".join(found) or "other"
