"""Step time of LoRA adapters kept in fp32 against adapters in bf16, on a bf16 base: the measured cost
behind the ``fp32_adapters`` diagnosis (``FP32_ADAPTER_SLOWDOWN`` in mfu_callbacks/diagnostics/checks/precision.py).

    python benchmarks/bench_fp32_adapters.py            # one CUDA GPU; about a minute on an H100

A Llama-style model of about 1.1B parameters (hidden 2048, 16 layers, intermediate 5632, 32 heads,
8 KV heads, vocabulary 32000) stored in bf16 and trained without autocast, LoRA r=16 on every
linear layer, batches of 4 x 2048 tokens, AdamW. PEFT upcasts adapters to fp32 by default
(``autocast_adapter_dtype=True``): their matmuls then run in fp32 on inputs cast up from bf16. The
other copy keeps them in bf16 (``autocast_adapter_dtype=False``). The copies run in interleaved
rounds, the first of each round alternating, and the medians of the per-round mean step times are
compared (order effects and noise are larger than small differences otherwise: see ``RESULTS.md``,
"Overhead against no measurement and against ThroughputMonitor").
Imports torch, transformers and peft only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 16, 5632, 32, 8, 32000
BATCH, SEQUENCE = 4, 2048
LORA_RANK = 16
WARMUP_STEPS = 3


def build(adapters_in_fp32: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The bf16 model with LoRA on every linear layer, adapters in fp32 (PEFT's default) or bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=SEQUENCE,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear")
    model = get_peft_model(base, lora, autocast_adapter_dtype=adapters_in_fp32)
    model.train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    expected = torch.float32 if adapters_in_fp32 else torch.bfloat16
    dtypes = {parameter.dtype for parameter in trainable}
    if dtypes != {expected}:
        sys.exit(f"expected every adapter weight in {expected}, found {dtypes}")
    return model, torch.optim.AdamW(trainable, lr=1e-4)


def train_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, steps: int
) -> float:
    """Mean seconds per training step over ``steps`` steps, timed with CUDA events."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1000.0 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument(
        "--steps-per-round", type=int, default=5, help="steps of each variant per round (default 5)"
    )
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench_fp32_adapters.py needs a CUDA GPU: the cost it measures is that of tensor-core matmuls"
        )
    began = time.perf_counter()
    variants = {"fp32": build(adapters_in_fp32=True), "bf16": build(adapters_in_fp32=False)}
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch = torch.randint(0, VOCAB, (BATCH, SEQUENCE), device="cuda", generator=generator)
    for model, optimizer in variants.values():
        train_steps(model, optimizer, batch, WARMUP_STEPS)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    ratios = []
    for round_index in range(arguments.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            seconds[name].append(train_steps(*variants[name], batch, arguments.steps_per_round))
        ratios.append(seconds["fp32"][-1] / seconds["bf16"][-1])
    fp32, bf16 = statistics.median(seconds["fp32"]), statistics.median(seconds["bf16"])
    print(
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"{arguments.rounds} rounds x {arguments.steps_per_round} steps per variant; "
        f"{time.perf_counter() - began:.0f} s in all"
    )
    print(
        f"median step time: fp32 adapters {fp32 * 1e3:.1f} ms, bf16 adapters {bf16 * 1e3:.1f} ms; "
        f"per-round ratio min {min(ratios):.3f}, max {max(ratios):.3f}"
    )
    print(f"fp32 adapters / bf16 adapters step time: {fp32 / bf16:.3f} ({arguments.rounds} rounds)")


if __name__ == "__main__":
    main()
