"""Transformer Engine layers counted by declared FLOPs, fp8 linears judged against the fp8 peak.

python examples/transformer_engine_declared.py             # CPU: stand-in modules, no Transformer Engine
python examples/transformer_engine_declared.py --te        # a GPU with transformer_engine installed

Transformer Engine's ``te.Linear``, ``te.LayerNormLinear``, ``te.LayerNormMLP`` and
``te.DotProductAttention`` (the parts a ``te.TransformerLayer`` is made of) multiply in their own CUDA
kernels, which neither torch's FlopCounterMode nor this package's count sees. ``declare_flops`` states
their forward FLOPs from their inputs' shapes; under ``te.fp8_autocast`` their linears run in fp8, so
those are declared with ``dtype="fp8"`` and MFU judges them against the fp8 peak, while attention (bf16
in Transformer Engine unless fp8 attention is switched on) is judged against the run's dtype.

Without ``--te`` the layers are stand-ins with the same names, parameters and input layout (sequence
first) made of torch operations, so the declarations can be run and checked anywhere.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch
from torch import nn

from mfu_callbacks import MFUMeter, declare_flops


def linear_flops(module: nn.Module, args: tuple, kwargs: dict) -> float:
    """A linear-like layer (Linear, LayerNormLinear, LayerNormMLP): 2 x tokens x its matmul weights.

    Every two-dimensional parameter is a weight the input meets once (the MLP's two); layer-norm
    weights and biases are elementwise.
    """
    tokens = args[0].shape[:-1].numel()
    return 2.0 * tokens * sum(p.numel() for p in module.parameters(recurse=False) if p.dim() == 2)


def attention_flops(module: nn.Module, args: tuple, kwargs: dict) -> float:
    """Scores and values of ``DotProductAttention(query, key, value)`` in the "sbhd" layout: 2 x batch x
    heads x query length x key length x (head size of the keys + of the values), every pair counted."""
    query, key, value = args[:3]
    q_len, batch, heads, qk_dim = query.shape
    return 2.0 * batch * heads * q_len * key.shape[0] * (qk_dim + value.shape[-1])


def declare_transformer_engine(te: SimpleNamespace | object) -> None:
    """The declarations, for Transformer Engine's classes or for the stand-ins."""
    for name, component in (("Linear", None), ("LayerNormLinear", None), ("LayerNormMLP", "mlp")):
        declare_flops(getattr(te, name), linear_flops, component=component, dtype="fp8")
    declare_flops(te.DotProductAttention, attention_flops, component="attention_scores")


# -- stand-ins: the same names, parameters and layouts as Transformer Engine's, in torch operations ----------
class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class LayerNormLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.layer_norm(x, x.shape[-1:], self.layer_norm_weight)
        return nn.functional.linear(x, self.weight, self.bias)


class LayerNormMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.fc1_weight = nn.Parameter(torch.randn(ffn_hidden_size, hidden_size) / hidden_size**0.5)
        self.fc2_weight = nn.Parameter(torch.randn(hidden_size, ffn_hidden_size) / ffn_hidden_size**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.layer_norm(x, x.shape[-1:], self.layer_norm_weight)
        return nn.functional.linear(
            nn.functional.gelu(nn.functional.linear(x, self.fc1_weight)), self.fc2_weight
        )


class DotProductAttention(nn.Module):
    def __init__(self, num_attention_heads: int, kv_channels: int) -> None:
        super().__init__()
        self.heads, self.head_size = num_attention_heads, kv_channels

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # sbhd -> bhsd
        scores = q @ k.transpose(-1, -2) / self.head_size**0.5
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return out.permute(2, 0, 1, 3).flatten(2)  # -> s, b, h * d


STAND_INS = SimpleNamespace(
    Linear=Linear,
    LayerNormLinear=LayerNormLinear,
    LayerNormMLP=LayerNormMLP,
    DotProductAttention=DotProductAttention,
)


class Layer(nn.Module):
    """A decoder layer built as ``te.TransformerLayer`` builds one: fused QKV with its layer norm,
    attention, output projection, layer norm with the MLP (sequence-first tensors)."""

    def __init__(self, te: SimpleNamespace | object, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = te.LayerNormLinear(hidden, 3 * hidden)  # type: ignore[attr-defined]
        self.attention = te.DotProductAttention(heads, hidden // heads)  # type: ignore[attr-defined]
        self.proj = te.Linear(hidden, hidden)  # type: ignore[attr-defined]
        self.mlp = te.LayerNormMLP(hidden, ffn)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, batch, hidden = x.shape
        q, k, v = self.qkv(x).view(seq, batch, 3, self.heads, hidden // self.heads).unbind(2)
        x = x + self.proj(self.attention(q, k, v))
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(
        self, te: SimpleNamespace | object, vocab: int, hidden: int, layers: int, heads: int
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(te, hidden, heads, 4 * hidden) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)  # a torch linear: the run's dtype

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).transpose(0, 1)  # sequence first, as Transformer Engine expects
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(x.transpose(0, 1))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def main(argv: list[str] | None = None) -> MFUMeter:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--te", action="store_true", help="use transformer_engine.pytorch (a CUDA GPU)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="CPU runs need a peak: default 1")
    args = parser.parse_args(argv)
    if args.te:
        import transformer_engine.pytorch as te

        device, autocast = torch.device("cuda"), te.fp8_autocast
    else:
        te, device, autocast = STAND_INS, torch.device("cpu"), None
    declare_transformer_engine(te)
    model = Model(te, args.vocab, args.hidden, args.layers, args.heads).to(device)
    peak = args.peak_tflops if args.peak_tflops is not None or device.type == "cuda" else 1.0
    meter = MFUMeter(model, peak_tflops=peak, warmup_steps=1, forward=lambda m, b: m(**b))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.steps):
        ids = torch.randint(args.vocab, (args.batch, args.seq_len), device=device)
        batch = {"input_ids": ids, "labels": ids}
        meter.start_step(batch)
        if autocast is not None:
            with autocast(enabled=True):
                loss = model(**batch)
        else:
            loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end_step()
    print(meter.summary(), meter.matmul_dtypes(), file=sys.stdout)
    return meter


if __name__ == "__main__":
    main()
