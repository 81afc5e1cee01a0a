"""The FLOP engine: built once per model, then evaluated per step from token counts.

Building it copies the model's structure onto the meta device (``replica.py``), runs a few tiny
forward passes of different shapes there while recording every matmul and what its backward
needs (``trace.py``), and fits the exact per-step formula

    FLOPs = c . features(batch)

per component, where the features are rows, tokens, squared lengths and calls (``features.py``).
Transformer FLOPs are exactly linear in those features, so the fit is exact; it is checked.
The probes are shorter than any attention window, so the trace sees windowed layers compute full
squares: their scores and values are recorded apart and moved to their window's feature after the fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._torch_internals import (
    flex_attention_on_meta,
    global_module_hooks_limited_to,
    meta_autocast_as_cpu,
    raised_by_meta_autocast,
    torch_linear,
)
from .checkpoint import checkpoint_to
from .components import ATTENTION_SCORES, windowed_scores
from .dtypes import is_without_grad, untagged
from .features import HARDWARE, MODEL, NUM_FEATURES, WINDOW_FEATURES, Feature, stream_features
from .flex import FlexKernel
from .isolation import map_tensors, preserved_random_state
from .layouts import Plan
from .model_config import token_counting, use_eager_kernels
from .observe import Observation
from .replica import Replica, build_replica, is_model_library_hook
from .step_flops import StepFlops
from .substitutes import install_substitutes
from .tokens import (
    DECODER_KEYS,
    GRID_KEYS,
    IMAGE_KEYS,
    MAIN_KEYS,
    PACKED_KEYS,
    BatchError,
    TokenCounter,
    TokenCounting,
)
from .trace import ComponentFlops, MatmulRecorder
from .unwrap import unwrap_model
from .windows import Window, window_of

logger = logging.getLogger("mfu_callbacks")

Forward = Callable[[nn.Module, Any], Any]

# Probe shapes (rows, main length, decoder length): distinct enough that the design matrix has full rank.
_PROBES_MAIN = ((1, 5, 0), (1, 7, 0), (1, 9, 0), (2, 5, 0), (3, 7, 0), (2, 8, 0))
_PROBES_ENCODER_DECODER = (
    (1, 5, 3),
    (1, 7, 3),
    (1, 9, 4),
    (2, 5, 6),
    (1, 5, 6),
    (3, 7, 4),
    (2, 9, 3),
    (1, 6, 7),
    (2, 7, 7),
)
_PROBES_ROWS = ((1, 0, 0), (2, 0, 0), (3, 0, 0))
_FIT_TOLERANCE = 1e-6


class ModelIntrospectionError(RuntimeError):
    """The model could be neither introspected nor traced."""


@dataclass
class ComponentCoefficients:
    """Forward, backward, recompute, forced-backward and kernel FLOPs of one component per unit of each
    feature (length NUM_FEATURES); the last three are hardware FLOPs only (see ``ComponentFlops``)."""

    forward: list[float]
    backward: list[float]
    recompute: list[float]
    forced: list[float]
    kernel: list[float]


# The fields of ComponentFlops and ComponentCoefficients, in the order the fit solves them.
_PARTS = ("forward", "backward", "recompute", "forced", "kernel")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How a batch reaches a model: keywords for a mapping, the first element for a tuple."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _resize(tensor: torch.Tensor, rows: int, length: int | None) -> torch.Tensor:
    shape = [rows, *tensor.shape[1:]]
    if length is not None and tensor.dim() >= 2:
        shape[1] = length
    return torch.empty(shape, dtype=tensor.dtype, device="meta")


def _extended(tensor: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """The template's first row on the CPU, its last column repeated up to ``length``, once per row."""
    row = tensor[:1].cpu()
    extra = length - row.shape[1]
    if extra > 0:
        row = torch.cat([row, row[:, -1:].expand(1, extra, *row.shape[2:])], dim=1)
    return row[:, :length].repeat(rows, *[1] * (row.dim() - 1))


class _ProbeBatches:
    """Makes meta-device batches shaped like the user's, at the probe sizes.

    Tensors with a row per sequence follow the probe's rows; images (``pixel_values``) follow them
    too, k per row where the template has k images a row. So a vision-language model's image work
    (vision tower, projector) is counted per row: exact when every row has the same number of
    images of the same size, as its text tokens (image placeholders included) are counted per token.

    A model that reads its image grids (``image_grid_thw``: Qwen2-VL) gets them as real CPU tensors,
    and with them the integer tensors of the text stream (attention mask, token types), whose values
    place the image tokens: copies of the template's first row, extended with its last (text) column.
    """

    def __init__(self, template: Any, counting: TokenCounting, custom_forward: bool) -> None:
        self.template = template
        self.custom_forward = custom_forward
        main, decoder, self.rows, _ = counting.streams(template)
        self.main_length = main.length if main is not None else None
        self.decoder_length = decoder.length if decoder is not None else None
        self.encoder_decoder = counting.encoder_decoder
        self.grids = isinstance(template, Mapping) and any(
            isinstance(template.get(key), torch.Tensor) for key in GRID_KEYS
        )

    def _stream_of(self, key: str | None, tensor: torch.Tensor) -> str | None:
        if key is not None and (
            key in DECODER_KEYS or key.startswith("decoder_") or (key == "labels" and self.encoder_decoder)
        ):
            return "decoder"
        if tensor.dim() >= 2 and tensor.shape[0] == self.rows and tensor.shape[1] == self.main_length:
            return "main"
        return None

    def _convert(
        self, key: str | None, value: torch.Tensor, rows: int, main: int, decoder: int
    ) -> torch.Tensor:
        per_row = self._items_per_row(key, value)
        if per_row is None:
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        if self.grids and key in GRID_KEYS:
            return value[:per_row].cpu().repeat(rows, 1)
        stream = self._stream_of(key, value)
        if (
            self.grids
            and stream == "main"
            and key not in (*MAIN_KEYS, "labels")
            and not value.is_floating_point()
        ):
            return _extended(value, rows, main)
        length = {"main": main, "decoder": decoder}.get(stream) if stream else None
        return _resize(value, rows * per_row, length)

    def _items_per_row(self, key: str | None, value: torch.Tensor) -> int | None:
        """Entries of the first dimension per row: 1 for per-row tensors, k for k images a row,
        None for a tensor that does not follow the rows."""
        if value.dim() == 0:
            return None
        if value.shape[0] == self.rows:
            return 1
        if key in (*IMAGE_KEYS, *GRID_KEYS) and value.shape[0] % self.rows == 0:
            return value.shape[0] // self.rows
        return None

    def make(self, rows: int, main: int, decoder: int) -> Any:
        """A batch of the template's layout at the probe's sizes, every tensor in it (nested too) on meta."""
        batch = self.template
        if isinstance(batch, Mapping) and not self.custom_forward:
            dropped = ("position_ids", *PACKED_KEYS, "max_length_q", "max_length_k")
            batch = {k: v for k, v in batch.items() if k not in dropped}
        return map_tensors(batch, lambda key, tensor: self._convert(key, tensor, rows, main, decoder))


@contextmanager
def _probe_hooks(
    replica: Replica, current: list[MatmulRecorder], *, meta_autocast: bool, build_length: int | None
) -> Iterator[None]:
    """Module-stack bookkeeping, checkpoint interception and flex_attention on meta tensors for the
    replica's forward, with only the model libraries' hooks among those registered for every module
    (a user's global hook never sees the probes) and torch's own ``F.linear`` (DeepSpeed ZeRO-3 puts
    one in a custom autograd Function, whose backward a trace cannot see); with ``meta_autocast``,
    ``torch.autocast(device_type="meta")`` does nothing instead of failing."""
    handles = []
    for module in replica.module.modules():
        path = replica.names.get(id(module), "")
        multiplicity = replica.multiplicity.get(id(module), 1)
        class_name = type(module).__name__
        declaration = replica.declarations.get(id(module))

        def enter(mod, args, kwargs, _path=path, _name=class_name, _mult=multiplicity, _declared=declaration):
            current[0].enter(_path, _name, _mult)
            if _declared is not None:
                forward, backward = _declared.flops_of_call(mod, args, kwargs)
                current[0].enter_declared(_declared.component, forward, backward, _declared.dtype)

        def leave(mod, args, output, _declared=declaration):
            if _declared is not None:
                current[0].exit_declared(output)
            current[0].exit()

        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, always_call=True))

    try:
        with (
            checkpoint_to(current),
            flex_attention_on_meta(FlexKernel(lambda: current[0], build_length)),
            global_module_hooks_limited_to(is_model_library_hook),
            meta_autocast_as_cpu() if meta_autocast else nullcontext(),
            torch_linear(),
        ):
            yield
    finally:
        for handle in handles:
            handle.remove()


class FlopEngine:
    """Exact training FLOPs of one model, per step, from the step's token counts."""

    def __init__(
        self, coefficients: dict[str, ComponentCoefficients], counting: TokenCounting, description: str
    ) -> None:
        self.counting = counting
        self.description = description
        # Keys are components with the dtype their matmuls run in (``dtypes.py``); the breakdown is by component.
        self.components: dict[str, list[float]] = {}
        model_by_dtype: dict[str, list[float]] = {}
        hardware_by_dtype: dict[str, list[float]] = {}
        for key, c in coefficients.items():
            component, dtype = untagged(key)
            model = [f + b for f, b in zip(c.forward, c.backward)]
            # Hardware FLOPs add what runs beyond the model's needs: the recompute, the forced input
            # gradients and what the attention kernel computes beyond (or short of) every pair.
            hardware = [m + r + f + k for m, r, f, k in zip(model, c.recompute, c.forced, c.kernel)]
            for into, name, values in (
                (self.components, component, model),
                (model_by_dtype, dtype, model),
                (hardware_by_dtype, dtype, hardware),
            ):
                into[name] = [a + b for a, b in zip(into.get(name, [0.0] * NUM_FEATURES), values)]
        self._model_by_dtype, self._hardware_by_dtype = model_by_dtype, hardware_by_dtype
        # The forward alone, per component: what a pass without backward costs (generation, ``generation.py``).
        self.forward_coefficients = {
            name: list(c.forward) for name, c in coefficients.items() if not is_without_grad(name)
        }
        self._model = [sum(values) for values in zip(*self.components.values())] or [0.0] * NUM_FEATURES
        extra = [
            sum(c.recompute[i] + c.forced[i] + c.kernel[i] for c in coefficients.values())
            for i in range(NUM_FEATURES)
        ]
        self._hardware = [m + e for m, e in zip(self._model, extra)]
        # Of those, what activation checkpointing reruns.
        self._recompute = [sum(c.recompute[i] for c in coefficients.values()) for i in range(NUM_FEATURES)]
        self._has_tokens = any(self._model[i] or self._hardware[i] for i in (Feature.TOKENS, Feature.SQUARES))

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        batch: Any,
        *,
        forward: Forward | None = None,
        token_counter: TokenCounter | None = None,
    ) -> FlopEngine:
        """Introspect ``model`` (any wrapper) with ``batch`` as the template of what a step sees."""
        base = unwrap_model(model)
        counting = token_counting(model, token_counter)
        windows = counting.windows
        probes = _ProbeBatches(batch, counting, custom_forward=forward is not None)
        if probes.main_length is None and probes.decoder_length is None:
            shapes: Sequence[tuple[int, int, int]] = _PROBES_ROWS
        elif probes.decoder_length is not None and probes.main_length is not None:
            shapes = _PROBES_ENCODER_DECODER
        elif probes.main_length is None:
            raise BatchError(
                "a decoder stream without an encoder stream: pass token_counter= to name the streams"
            )
        else:
            # Rows laid out by image grids keep the template's layout: probes add text after it.
            offset = probes.main_length if probes.grids else 0
            shapes = tuple((rows, offset + main, decoder) for rows, main, decoder in _PROBES_MAIN)
        run = forward or default_forward
        errors: list[str] = []
        for fold in (True, False):
            try:
                totals, replica, substituted = _trace(model, probes, shapes, run, fold=fold, windows=windows)
                break
            except BatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of the model's own code on meta
                errors.append(f"{type(error).__name__}: {error}")
        else:
            raise ModelIntrospectionError(
                f"could not trace {type(base).__name__} on the meta device ({errors[-1]}). If the model does not "
                "take the batch as keyword arguments, pass forward=lambda model, batch: model(...) (returning "
                "the loss); if its forward cannot run on the meta device (custom kernels without a meta "
                "implementation), pass a forward= that runs an equivalent made of torch operations."
            )
        coefficients = _assign_windows(_fit(totals, shapes))
        description = _describe(base, replica, substituted, coefficients, windows)
        logger.info(description)
        return cls(coefficients, counting, description)

    @classmethod
    def from_observation(
        cls,
        model: nn.Module,
        observation: Observation,
        counting: TokenCounting,
        features: Sequence[Sequence[float]],
    ) -> FlopEngine:
        """The engine fitted to one observed real step (``observe.py``) whose features (model and
        hardware rows, as ``count`` gives them) are given."""
        if observation.failure is not None or not observation.complete:
            raise ModelIntrospectionError(
                f"the observed step of {type(unwrap_model(model)).__name__} could not be counted: "
                + (observation.failure or "no backward ran while it was observed")
            )
        coefficients = {
            name: ComponentCoefficients(*parts) for name, parts in observation.fit(features).items()
        }
        description = (
            f"mfu_callbacks: FLOPs of {type(unwrap_model(model)).__name__} counted on a real training step; "
            f"components: {', '.join(sorted(coefficients))}"
        )
        return cls(coefficients, counting, description)

    # -- per step -------------------------------------------------------------------------------
    def count(self, batch: Any) -> torch.Tensor:
        """Feature tensor of a batch, on its device, without a host sync; sums over micro-batches are valid."""
        return self.counting.count(batch)

    def defer(self, batch: Any) -> tuple[Plan, tuple[torch.Tensor, ...]]:
        """What counting a batch takes on the training step (see ``TokenCounting.defer``)."""
        return self.counting.defer(batch)

    def evaluate(self, features: torch.Tensor | Sequence[Sequence[float]]) -> StepFlops:
        """FLOPs of the step whose (summed) features are given."""
        values = features.tolist() if isinstance(features, torch.Tensor) else features
        model_features, hardware_features = values[MODEL], values[HARDWARE]
        if min(model_features) < 0 or min(hardware_features) < 0:
            raise ValueError(
                f"negative token counts or lengths in the features {values}: counts come from "
                "FlopEngine.count(batch) (summed over micro-batches), never below zero"
            )
        model_flops = _dot(self._model, model_features)
        hardware_flops = _dot(self._hardware, hardware_features)
        breakdown = {name: round(_dot(c, model_features)) for name, c in self.components.items()}
        model_by_dtype = {name: round(_dot(c, model_features)) for name, c in self._model_by_dtype.items()}
        hardware_by_dtype = {
            name: round(_dot(c, hardware_features)) for name, c in self._hardware_by_dtype.items()
        }
        if self._has_tokens:
            tokens = model_features[Feature.TOKENS] + model_features[Feature.DECODER_TOKENS]
            padded = hardware_features[Feature.TOKENS] + hardware_features[Feature.DECODER_TOKENS]
        else:
            tokens = padded = model_features[Feature.ROWS]
        return StepFlops(
            round(model_flops),
            round(hardware_flops),
            int(tokens),
            int(padded),
            breakdown,
            model_by_dtype,
            hardware_by_dtype,
        )

    def recompute_flops(self, features: torch.Tensor | Sequence[Sequence[float]]) -> float:
        """Of the hardware FLOPs of the step whose features are given, those activation checkpointing reran."""
        values = features.tolist() if isinstance(features, torch.Tensor) else features
        return _dot(self._recompute, values[HARDWARE])

    def estimate(self, batch: Any) -> StepFlops:
        """Count and evaluate one batch (reads the counts back: for tools and tests, not the hot path)."""
        return self.evaluate(self.count(batch).cpu())

    @property
    def dtypes(self) -> frozenset[str]:
        """The dtypes this model's matmuls run in (``dtypes.py``: "" for the run's dtype, "fp8", ...)."""
        return frozenset(self._model_by_dtype) | frozenset(self._hardware_by_dtype)

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per token, attention excluded (the part linear in tokens)."""
        return self._model[Feature.TOKENS] + self._model[Feature.DECODER_TOKENS]


def _dot(coefficients: Sequence[float], features: Sequence[float]) -> float:
    return sum(c * f for c, f in zip(coefficients, features) if c)


def _trace(
    model: nn.Module,
    probes: _ProbeBatches,
    shapes: Sequence[tuple[int, int, int]],
    run: Forward,
    *,
    fold: bool,
    windows: tuple[Window, ...] = (),
) -> tuple[list[dict[str, ComponentFlops]], Replica, list[str]]:
    replica = build_replica(model, fold=fold)
    use_eager_kernels(replica.module)
    owners = replica.parameter_owners()
    slots = {
        replica.names[id(module)]: windows.index(window)
        for module in replica.module.modules()
        if (window := window_of(module)) in windows and id(module) in replica.names
    }
    current: list[MatmulRecorder] = [
        MatmulRecorder(replica.parameter_ids, owners, slots, replica.shards, replica.frozen, replica.copies)
    ]
    substituted = install_substitutes(replica.module, _CurrentRecorder(current))

    def run_probes(meta_autocast: bool) -> list[dict[str, ComponentFlops]]:
        totals = []
        with (
            preserved_random_state(),
            _probe_hooks(replica, current, meta_autocast=meta_autocast, build_length=probes.main_length),
            torch.enable_grad(),
        ):
            for rows, main, decoder in shapes:
                recorder = MatmulRecorder(
                    replica.parameter_ids, owners, slots, replica.shards, replica.frozen, replica.copies
                )
                current[0] = recorder
                with recorder:
                    result = run(replica.module, probes.make(rows, main, decoder))
                totals.append(recorder.finish(result))
        return totals

    try:
        return run_probes(meta_autocast=False), replica, substituted
    except Exception as error:
        if not raised_by_meta_autocast(error):
            raise
    # The model opens torch.autocast on its inputs' device type (PEFT's LoRA on parameters does): only then,
    # and only for these meta forwards, is autocast told to accept the meta device.
    return run_probes(meta_autocast=True), replica, substituted


class _CurrentRecorder:
    """Lets substitutes installed once record into whichever probe's recorder is current."""

    def __init__(self, current: list[MatmulRecorder]) -> None:
        self._current = current

    def record_module_matmul(
        self, forward: float, operands_requiring_grad: int, output: torch.Tensor | None, forced: int = 0
    ) -> None:
        self._current[0].record_module_matmul(forward, operands_requiring_grad, output, forced)

    def backward_products(self, *operands: Sequence[torch.Tensor]) -> tuple[int, int]:
        return self._current[0].backward_products(*operands)

    def note_saved(self) -> None:
        self._current[0].note_saved()


def _fit(
    totals: list[dict[str, ComponentFlops]], shapes: Sequence[tuple[int, int, int]]
) -> dict[str, ComponentCoefficients]:
    """Solve totals = design @ coefficients exactly, per component and per pass."""
    design = torch.tensor(
        [stream_features(rows, main, decoder or None) for rows, main, decoder in shapes], dtype=torch.float64
    )
    active = [i for i in range(NUM_FEATURES) if design[:, i].abs().sum() > 0]
    reduced = design[:, active]
    components = sorted({name for probe in totals for name in probe})
    targets = torch.tensor(
        [
            [getattr(probe.get(name, ComponentFlops()), part) for name in components for part in _PARTS]
            for probe in totals
        ],
        dtype=torch.float64,
    )
    solution = torch.linalg.lstsq(reduced, targets).solution if components else torch.zeros(len(active), 0)
    residual = (reduced @ solution - targets).abs().max().item() if components else 0.0
    scale = max(targets.abs().max().item(), 1.0) if components else 1.0
    if residual > _FIT_TOLERANCE * scale:
        logger.warning(
            "mfu_callbacks: FLOPs of this model are not linear in tokens and squared lengths "
            "(fit residual %.3g of %.3g); counts are approximate",
            residual,
            scale,
        )
    coefficients: dict[str, ComponentCoefficients] = {}
    for index, name in enumerate(components):
        parts = []
        for offset in range(len(_PARTS)):
            full = [0.0] * NUM_FEATURES
            for column, feature in enumerate(active):
                value = solution[column, len(_PARTS) * index + offset].item()
                full[feature] = 0.0 if abs(value) < 1e-9 * scale else value
            parts.append(full)
        if any(any(p) for p in parts):
            coefficients[name] = ComponentCoefficients(*parts)
    return coefficients


def _assign_windows(coefficients: dict[str, ComponentCoefficients]) -> dict[str, ComponentCoefficients]:
    """Scores and values of windowed layers scale with their window's squares: the probes, shorter than
    any window, fitted them to the full squares, the same per square. They join ATTENTION_SCORES."""
    for slot, feature in enumerate(WINDOW_FEATURES):
        for key in [key for key in coefficients if untagged(key)[0] == windowed_scores(slot)]:
            windowed = coefficients.pop(key)
            scores = coefficients.setdefault(
                key.replace(windowed_scores(slot), ATTENTION_SCORES, 1),
                ComponentCoefficients(*([0.0] * NUM_FEATURES for _ in _PARTS)),
            )
            for part, into in zip(
                (getattr(windowed, name) for name in _PARTS), (getattr(scores, name) for name in _PARTS)
            ):
                part[feature], part[Feature.SQUARES] = part[Feature.SQUARES], 0.0
                for index, value in enumerate(part):
                    into[index] += value
    return coefficients


def _describe(
    base: nn.Module,
    replica: Replica,
    substituted: list[str],
    coefficients: dict[str, ComponentCoefficients],
    windows: tuple[Window, ...] = (),
) -> str:
    folded = f"; repeated layers traced once: {', '.join(replica.folded)}" if replica.folded else ""
    windowed = f"; attention windows: {', '.join(map(str, windows))}" if windows else ""
    analytic = f"; counted from shapes: {', '.join(substituted)}" if substituted else ""
    declared = [replica.names.get(i, "") or type(base).__name__ for i in replica.declarations]
    analytic += f"; FLOPs declared: {', '.join(declared)}" if declared else ""
    scores = (
        " (attention scores from head dimensions x squared lengths)"
        if ATTENTION_SCORES in coefficients
        else ""
    )
    return (
        f"mfu_callbacks: FLOPs of {type(base).__name__} traced on a meta-device replica{scores}{windowed}{folded}"
        f"{analytic}; "
        f"components: {', '.join(sorted(coefficients))}"
    )
