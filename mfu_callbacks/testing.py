"""Tiny models built from configs, and torch's FlopCounterMode as the independent reference, for
tests, examples and benchmarks.

    model = causal_lm(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64, lora_rank=4)
    flops = reference_step_flops(model, batch, eager_copy=True)   # forward + backward, as torch counts it

Nothing is downloaded: models are initialised from a config. Transformers (and PEFT, for LoRA) are
imported when a model is built, so this module, like the rest of the package, needs torch alone.

The reference is ``torch.utils.flop_counter.FlopCounterMode`` around one forward and backward. It
counts exactly what ran, padding and recompute included, but only for the kernels it sees: eager
attention (it misses SDPA on CPU and fails on SDPA with grouped-query attention on CUDA) and eager
MoE experts (it misses transformers' grouped-mm experts kernel). ``make_eager`` switches a model
to those; ``eager_copy=True`` counts on an eager copy and leaves the caller's model as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._torch_internals import SYNCING_OPERATIONS, TorchDispatchMode

__all__ = [
    "SYNCING_OPERATIONS",
    "OperationLog",
    "TopKMoE",
    "causal_lm",
    "configs_of",
    "make_eager",
    "moe_lm",
    "reference_step_flops",
    "word_tokenizer",
]


class OperationLog(TorchDispatchMode):
    """The aten operations dispatched inside it, by name (``aten.sum``), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def causal_lm(
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 64,
    max_positions: int = 64,
    attention: str = "sdpa",
    experts: int = 0,
    experts_per_token: int = 2,
    lora_rank: int | None = None,
    lora_targets: str | Sequence[str] = "all-linear",
    seed: int = 0,
) -> nn.Module:
    """A Llama-style causal LM from a config, weights drawn after ``torch.manual_seed(seed)``.

    kv_heads: key/value heads (grouped-query attention); default: as many as ``heads``.
    intermediate: MLP width (of each expert under MoE); default: twice ``hidden``.
    attention: transformers' attention implementation ("sdpa", "eager", ...).
    experts: routed experts per layer; above 0 the model is a Mixtral (``experts_per_token`` of them
        per token) instead of a Llama.
    lora_rank: wrap the model in PEFT LoRA adapters of this rank (alpha twice the rank) on ``lora_targets``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    sizes: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 2 * hidden,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
    )
    config: MixtralConfig | LlamaConfig
    if experts:
        config = MixtralConfig(num_local_experts=experts, num_experts_per_tok=experts_per_token, **sizes)
    else:
        config = LlamaConfig(**sizes)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model: nn.Module = (
        MixtralForCausalLM(config) if isinstance(config, MixtralConfig) else LlamaForCausalLM(config)
    )
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets if isinstance(lora_targets, str) else list(lora_targets)
        model = get_peft_model(
            model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets)
        )
    return model


def configs_of(model: nn.Module) -> Iterator[Any]:
    """Every transformers config in the model, sub-configs (text, vision, encoder, decoder) included, once each."""
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and id(config) not in seen:
            seen.add(id(config))
            yield config
            for key in ("text_config", "vision_config", "encoder", "decoder"):
                sub = getattr(config, key, None)
                if sub is not None and hasattr(sub, "to_dict") and id(sub) not in seen:
                    seen.add(id(sub))
                    yield sub


def make_eager(model: nn.Module) -> nn.Module:
    """Switch the model to eager attention and eager experts, the kernels FlopCounterMode counts exactly."""
    for config in configs_of(model):
        config._attn_implementation = "eager"
        config._experts_implementation = "eager"
    return model


def reference_step_flops(
    model: nn.Module,
    batch: Any,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    eager_copy: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """FLOPs of one training step (forward + backward) as torch's FlopCounterMode counts them.

    forward: fn(model, batch) -> output; default ``model(**batch)``. The backward starts from the
        output's ``loss`` (attribute or key), or else from the sum of its logits (the loss itself has no matmul).
    eager_copy: count on a deep copy switched to eager kernels (``make_eager``); otherwise the model
        runs as it is, and its gradients are cleared afterwards.
    autocast_dtype: run the forward under autocast at this dtype, on the batch's device.
    """
    reference = make_eager(copy.deepcopy(model)) if eager_copy else model
    run = forward or (lambda module, inputs: module(**inputs))
    precision = torch.autocast(_device_type(batch), dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with FlopCounterMode(display=False) as counter:
        with precision:
            output = run(reference, batch)
        _loss(output).backward()
    if not eager_copy:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _loss(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is not None:
        return loss
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.float().sum()


def _device_type(batch: Any) -> str:
    """Where the batch lives (autocast is entered per device type): its first tensor's device."""
    values = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (tuple, list))
        else [batch]
    )
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    return tensors[0].device.type if tensors else "cpu"


# -- a mixture of experts routed by hand, which no meta-device copy can run ---------------------------
class TopKMoE(nn.Module):
    """Top-k experts with data-dependent dispatch, written the ways people write it by hand:
    ``where`` (torch.where on the choices), ``nonzero``, ``split`` (tokens sorted by expert, sizes read
    back with ``bincount(...).tolist()``) and ``capacity`` (GShard: one-hot dispatch and combine
    einsums per sequence, each expert taking at most capacity tokens)."""

    def __init__(self, hidden: int, inner: int, experts: int, top_k: int, dispatch: str = "where") -> None:
        super().__init__()
        self.top_k, self.dispatch = top_k, dispatch
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden, inner, bias=False), nn.SiLU(), nn.Linear(inner, hidden, bias=False)
            )
            for _ in range(experts)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.dispatch == "capacity":
            return self._capacity(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights, chosen = torch.softmax(self.router(flat), dim=-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        if self.dispatch == "split":
            order = chosen.flatten().argsort()
            token = order // self.top_k
            sizes = chosen.flatten().bincount(minlength=len(self.experts)).tolist()
            for expert, tokens, slots in zip(self.experts, token.split(sizes), order.split(sizes)):
                if tokens.numel():
                    routed = expert(flat[tokens]) * weights.flatten()[slots, None]
                    out.index_add_(0, tokens, routed.to(out.dtype))
            return out.reshape(hidden.shape)
        for index, expert in enumerate(self.experts):
            if self.dispatch == "nonzero":
                token, slot = (chosen == index).nonzero(as_tuple=True)
            else:
                token, slot = torch.where(chosen == index)
            if token.numel():
                out.index_add_(0, token, (expert(flat[token]) * weights[token, slot, None]).to(out.dtype))
        return out.reshape(hidden.shape)

    def _capacity(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, length, _ = hidden.shape
        experts = len(self.experts)
        capacity = self.top_k * length // experts  # capacity factor 1: a sequence's fair share
        weights, chosen = torch.softmax(self.router(hidden), dim=-1).topk(self.top_k, dim=-1)
        mask = F.one_hot(chosen, experts).sum(dim=2).float()  # [rows, length, experts]
        position = (mask.cumsum(dim=1) - 1) * mask  # each token's place in its expert's queue
        kept = mask * (position < capacity)
        slots = F.one_hot(position.long().clamp(max=capacity - 1), capacity).float()
        dispatch = kept.unsqueeze(-1) * slots  # [rows, length, experts, capacity]: overflow dropped
        gate = (F.one_hot(chosen, experts).float() * weights.unsqueeze(-1)).sum(dim=2)
        combine = dispatch * gate.unsqueeze(-1)
        routed = torch.einsum("rsec,rsm->recm", dispatch, hidden)
        done = torch.stack([expert(routed[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("rsec,recm->rsm", combine, done)


class _MoELM(nn.Module):
    """Embedding, blocks of ``TopKMoE`` with residuals, a head; its forward returns the loss."""

    def __init__(
        self, vocab: int, hidden: int, inner: int, layers: int, experts: int, top_k: int, dispatch: str
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(TopKMoE(hidden, inner, experts, top_k, dispatch) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Any = None
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        logits = self.lm_head(hidden).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def moe_lm(
    *,
    vocab: int,
    hidden: int,
    inner: int,
    layers: int,
    experts: int,
    top_k: int,
    dispatch: str = "where",
    seed: int = 0,
) -> nn.Module:
    """A language model of ``TopKMoE`` blocks (no attention), weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return _MoELM(vocab, hidden, inner, layers, experts, top_k, dispatch)


def word_tokenizer(vocab: int) -> Any:
    """A tokenizer built in memory (nothing downloaded): words ``w3`` ... ``w{vocab-1}``, ids 0-2 for
    pad, unknown and end of sequence. For trainers that want one (TRL's ``SFTTrainer``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
