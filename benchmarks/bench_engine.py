"""Cost of the FLOP engine on a Llama-3-70B-sized model: building it once, and evaluating it per step.

Targets (issue 2): build on the meta device in under 2 s and 200 MB of extra memory; per-step
``evaluate`` under 50 us median. Run: ``python benchmarks/bench_engine.py``.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
import tracemalloc

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mfu_callbacks.flops import FlopEngine

_EVALUATIONS = 20_000


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def llama_70b() -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        max_position_embeddings=8192,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config).train()


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def measure(label: str, model: torch.nn.Module) -> None:
    batch = {
        "input_ids": torch.randint(0, 1000, (4, 2048)),
        "attention_mask": torch.ones(4, 2048, dtype=torch.long),
    }
    gc.collect()
    rss_before = _rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    engine = FlopEngine.from_model(model, batch)
    build_seconds = time.perf_counter() - start
    _, peak_traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_extra = _rss_mb() - rss_before
    features = engine.count(batch).cpu()
    timings = []
    for _ in range(_EVALUATIONS):
        start = time.perf_counter_ns()
        engine.evaluate(features)
        timings.append(time.perf_counter_ns() - start)
    step = engine.evaluate(features)
    print(
        f"{label}: build {build_seconds:.2f} s, peak traced {peak_traced / 2**20:.1f} MB, "
        f"extra RSS {rss_extra:.1f} MB, evaluate median {statistics.median(timings) / 1000:.1f} us "
        f"(p90 {sorted(timings)[int(0.9 * len(timings))] / 1000:.1f} us), "
        f"{step.model_flops / 1e15:.2f} PFLOP per step of 4 x 2048 tokens"
    )


def main() -> None:
    print(f"torch {torch.__version__}, {_EVALUATIONS} evaluations each")
    measure("Llama-3-70B full fine-tuning", llama_70b())
    measure("Llama-3-70B LoRA r=16 all-linear", with_lora(llama_70b()))


if __name__ == "__main__":
    main()
