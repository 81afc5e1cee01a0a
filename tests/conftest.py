"""Shared test helpers: batches of known shape, tiny models, the fixture that fakes every meter's engine and
clock, and torch's own FLOP counter as the truth. The fakes themselves live in ``helpers/fakes.py``.

The truth of a step is ``torch.utils.flop_counter.FlopCounterMode`` around forward + backward of the
real model on CPU, with eager attention and eager MoE experts (the kernels it counts exactly: its SDPA
formula fails on grouped-query attention, see ``benchmarks/RESULTS.md``, "MFU accuracy of each integration"). Model FLOPs exclude padding and recompute, so their truth runs
each real sequence (each row without its padding, each document of a packed row) alone with
checkpointing off (and without the hook that forces an input gradient); hardware FLOPs are the
batch as it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from mfu_callbacks.meter import MFUMeter
from mfu_callbacks.testing import causal_lm, configs_of, make_eager, reference_step_flops
from mfu_callbacks.timer import StepTimer
from tests.helpers.fakes import FakeClock, TokenEngine

# Tiny models gain nothing from intra-op threads, and on a busy machine a test's threads spin
# waiting for each other: one thread per test process (pytest-xdist runs a process per core).
torch.set_num_threads(1)

VOCAB = 128
LENGTHS = (6, 11)  # every case is checked at two sequence lengths

Forward = Callable[[nn.Module, Any], Any]


# -- tiers -----------------------------------------------------------------------------------------
def one_per_family(names: Iterable[str], representative: str) -> list[Any]:
    """Parameters of an architecture sweep: the representative runs in the unit tier, the rest are marked slow."""
    return [pytest.param(name, marks=() if name == representative else pytest.mark.slow) for name in names]


# The config arguments of a small 4-layer decoder (grouped-query attention, two key/value heads).
SMALL_DECODER = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps its state per process: what one test's Trainer or Accelerator set up (mixed
    precision, say) would reach the next test run in the same worker. Each test leaves none behind."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


# -- batches ---------------------------------------------------------------------------------------
def _tokens(rows: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=generator)


def full_batch(rows: int, length: int, *, labels: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of equal length, no padding."""
    ids = _tokens(rows, length, seed)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = ids.clone()
    return batch


def padded_batch(
    lengths: list[int], *, side: str = "right", labels: bool = True, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Rows of mixed real lengths padded to the longest (pad id 0, label -100 on padding)."""
    width = max(lengths)
    ids = _tokens(len(lengths), width, seed)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, width - length :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def packed_batch(documents: list[int], *, labels: bool = True, seed: int = 2) -> dict[str, torch.Tensor]:
    """One row of documents laid end to end, positions restarting at each, no attention mask
    (what ``DataCollatorWithFlattening`` feeds a model)."""
    ids = _tokens(1, sum(documents), seed)
    positions = torch.cat([torch.arange(length) for length in documents]).unsqueeze(0)
    batch = {"input_ids": ids, "position_ids": positions}
    if labels:
        batch["labels"] = ids.clone()
    return batch


def seq2seq_batch(encoder: list[int], decoder: list[int], *, seed: int = 3) -> dict[str, torch.Tensor]:
    """Encoder rows padded to the longest (attention_mask) and decoder labels padded with -100."""
    batch = padded_batch(encoder, labels=False, seed=seed)
    labels = _tokens(len(decoder), max(decoder), seed + 1)
    for row, length in enumerate(decoder):
        labels[row, length:] = -100
    batch["labels"] = labels
    return batch


DECODER_KEYS = ("labels", "decoder_input_ids", "decoder_attention_mask")


def documents(
    batch: Mapping[str, torch.Tensor], *, encoder_decoder: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Each real sequence of a batch alone, without padding: rows by their attention mask (and, for an
    encoder-decoder, the decoder side by its own mask or its labels' -100), packed rows split where
    the positions restart."""
    if "position_ids" in batch and "attention_mask" not in batch:
        positions = batch["position_ids"]
        for row in range(positions.shape[0]):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [positions.shape[1]]
            for start, end in zip(starts[:-1], starts[1:]):
                piece = {  # the per-token tensors; boundaries (cu_seq_lens_*) describe the whole row
                    key: value[row : row + 1, start:end]
                    for key, value in batch.items()
                    if value.shape == positions.shape
                }
                yield piece
        return
    mask = batch["attention_mask"].bool()
    decoder_mask = None
    if encoder_decoder:
        if "decoder_attention_mask" in batch:
            decoder_mask = batch["decoder_attention_mask"].bool()
        elif "labels" in batch:
            decoder_mask = batch["labels"] != -100
    for row in range(mask.shape[0]):
        piece = {}
        for key, value in batch.items():
            if encoder_decoder and key in DECODER_KEYS:
                piece[key] = (
                    value[row : row + 1][:, decoder_mask[row]]
                    if decoder_mask is not None
                    else value[row : row + 1]
                )
            elif value.dim() >= 2 and value.shape[1] == mask.shape[1]:
                piece[key] = value[row : row + 1][:, mask[row]]
            else:
                piece[key] = value[row : row + 1]
        yield piece


# -- models ----------------------------------------------------------------------------------------
TINY_VOCAB = 64  # the integration tests' tiny Llama
SEQ = 16


def tiny_llama(lora: bool = False, seed: int = 0) -> nn.Module:
    """The integration tests' model: a 2-layer Llama with eager attention (so the truth counts it as it runs)."""
    return causal_lm(
        hidden=32,
        intermediate=64,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=TINY_VOCAB,
        attention="eager",
        lora_rank=4 if lora else None,
        lora_targets=["q_proj", "v_proj"],
        seed=seed,
    )


class FixedLengthTokens(Dataset):
    """Rows of equal length: every step then needs the same FLOPs, which makes MFU checkable."""

    def __init__(self, size: int, length: int = SEQ, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, TINY_VOCAB, (size, length), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def accelerate_loop(accelerator: Any, model: nn.Module, optimizer: Any, loader: Any) -> None:
    """The plain Accelerate loop of README: each batch a step, its loss logged to the trackers."""
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"train/loss": loss.item()}, step=step)


@contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """The same model with activation checkpointing switched off (hooks and frozen state unchanged)."""
    flags = [
        (m, m.gradient_checkpointing)
        for m in model.modules()
        if isinstance(getattr(m, "gradient_checkpointing", None), bool)
    ]
    for module, _ in flags:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module, flag in flags:
            module.gradient_checkpointing = flag


# The forward hook of ``enable_input_require_grads`` (transformers' name, then PEFT's): it makes the input
# embeddings' output require a gradient that no trainable parameter asks for.
_FORCED_GRADIENT_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextmanager
def input_gradients_unforced(model: nn.Module) -> Iterator[None]:
    """The same model without the hooks that make its input embeddings require a gradient."""
    removed = []
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _FORCED_GRADIENT_HOOKS:
                removed.append((module, key, module._forward_hooks.pop(key)))
    try:
        yield
    finally:
        for module, key, hook in removed:
            module._forward_hooks[key] = hook


# -- user hooks ------------------------------------------------------------------------------------
class HookSpy:
    """An activation monitor on every kind of user hook: each call reads a value back (``.item()``, which
    fails on a meta tensor) and counts the calls that were handed a meta tensor. Per-module hooks go on
    the modules given to ``attach``; hooks for every module are registered while the spy is entered."""

    def __init__(self) -> None:
        self.calls = 0
        self.meta_calls = 0
        self._handles: list[Any] = []

    def _seen(self, *values: Any) -> None:
        tensors = [t for t in _flat(values) if isinstance(t, torch.Tensor)]
        self.calls += 1
        self.meta_calls += any(t.device.type == "meta" for t in tensors)
        for tensor in tensors[:1]:
            tensor.detach().float().abs().max().item()

    def hook(self, *values: Any) -> None:
        self._seen(*values)

    def attach(self, *modules: nn.Module) -> None:
        for module in modules:
            self._handles += [
                module.register_forward_pre_hook(self.hook),
                module.register_forward_pre_hook(self.hook, with_kwargs=True),
                module.register_forward_hook(self.hook, with_kwargs=True),
                module.register_forward_hook(self.hook, always_call=True),
                module.register_full_backward_hook(self.hook),
                module.register_full_backward_pre_hook(self.hook),
            ]

    def __enter__(self) -> HookSpy:
        from torch.nn.modules import module as torch_module

        self._handles += [
            torch_module.register_module_forward_pre_hook(self.hook),
            torch_module.register_module_forward_hook(self.hook),
            torch_module.register_module_forward_hook(self.hook, always_call=True),
            torch_module.register_module_full_backward_hook(self.hook),
            torch_module.register_module_full_backward_pre_hook(self.hook),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _flat(item)
    else:
        yield value


# -- the integrations' fake meter ------------------------------------------------------------------
@pytest.fixture
def fake_meter(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every MFUMeter the integrations build in this test counts with a TokenEngine and times with a fake clock."""
    clock = FakeClock()
    build = MFUMeter.__init__

    def build_with_fakes(self: MFUMeter, model: nn.Module, **options: Any) -> None:
        given = options.get("options")
        warmup = given.warmup_steps if given is not None else options.get("warmup_steps", 2)
        options.setdefault("engine", TokenEngine(clock))
        options.setdefault("timer", StepTimer(warmup, clock=clock, force_cpu=True))
        build(self, model, **options)

    monkeypatch.setattr(MFUMeter, "__init__", build_with_fakes)
    return clock


# -- the truth -------------------------------------------------------------------------------------
def keyword_forward(model: nn.Module, batch: Any) -> Any:
    return model(**batch)


def step_truth(model: nn.Module, batch: Any, forward: Forward = keyword_forward) -> int:
    """FLOPs of one training step (forward + backward) as torch's FlopCounterMode counts them."""
    return reference_step_flops(model, batch, forward)


def model_truth(
    model: nn.Module, batch: Mapping[str, torch.Tensor], forward: Forward = keyword_forward
) -> int:
    """Model FLOPs: every real sequence alone (a batch without padding as it is), no recompute, and no
    input gradients that only a hook asks for."""
    masks = [batch.get("attention_mask"), batch.get("decoder_attention_mask")]
    labels = batch.get("labels")
    unpadded = (
        "position_ids" not in batch
        and all(m is None or bool(m.all()) for m in masks)
        and (labels is None or bool((labels != -100).all()))
    )
    encoder_decoder = any(getattr(config, "is_encoder_decoder", False) for config in configs_of(model))
    with checkpointing_off(model), input_gradients_unforced(model):
        if unpadded:
            return step_truth(model, batch, forward)
        return sum(
            step_truth(model, piece, forward) for piece in documents(batch, encoder_decoder=encoder_decoder)
        )


def assert_flops(actual: int, expected: int, what: str, rel: float = 0.0) -> None:
    """Exact unless a tolerance is given (at most 1%)."""
    assert expected > 0, f"{what}: the truth is zero, nothing was checked"
    assert abs(actual - expected) <= rel * expected, (
        f"{what}: engine {actual:,} vs truth {expected:,} ({actual / expected - 1:+.3%})"
    )


def check_engine(
    model: nn.Module, template: Any, batches: list[Any], forward: Forward | None = None, **engine_options: Any
) -> None:
    """Engine built from the model as the user left it (default attention: sdpa) against the truth
    of each batch, taken with eager attention and experts."""
    from mfu_callbacks.flops import FlopEngine

    engine = FlopEngine.from_model(model, template, forward=forward, **engine_options)
    make_eager(model)
    for batch in batches:
        step = engine.estimate(batch)
        assert_flops(step.model_flops, model_truth(model, batch, forward or keyword_forward), "model FLOPs")
        assert_flops(
            step.hardware_flops, step_truth(model, batch, forward or keyword_forward), "hardware FLOPs"
        )


# -- several processes ----------------------------------------------------------------------------------
def gloo_reports(
    rank_main: Callable[..., None], groups: Sequence[tuple[int, tuple, Path]], seconds: float
) -> list[list[dict]]:
    """Start one process group per (world size, ``rank_main``'s arguments after the rank, folder), all at
    once (they overlap their start-up); fail the test if they run past ``seconds``; each group's reports,
    the JSON every rank wrote to ``rank{rank}.json`` in its folder."""
    contexts = [mp.spawn(rank_main, args=args, nprocs=size, join=False) for size, args, _ in groups]
    deadline = time.monotonic() + seconds
    for (size, _, _), context in zip(groups, contexts):
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in (process for context in contexts for process in context.processes):
                    process.kill()
                pytest.fail(f"the {size}-process gloo group did not finish in {seconds:.0f} s")
    return [
        [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(size)]
        for size, _, folder in groups
    ]


def torchrun(
    script: Path,
    *arguments: str,
    tag: str,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stderr: list[str] | None = None,
) -> list[dict]:
    """Run ``script`` on two CPU processes under torchrun (it sets the environment the frameworks read);
    the JSON of every output line that starts with ``tag``. ``env``: added to this environment;
    ``stderr``: a list the processes' standard error is appended to."""
    import os

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(script), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    if stderr is not None:
        stderr.append(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return [
        json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith(tag + " ")
    ]
