"""DPO with a separate reference model: logged model FLOPs and MFU against an independent truth.

TRL's ``DPOTrainer`` with its defaults but gradient checkpointing off (bf16 on a GPU, its fused LM
head), full fine-tuning, a separate unfrozen reference model, a Llama-style model of the sizes in
``common.py`` (``mid``: hidden 1024, 8 layers), every sequence of the same length (no padding).
``MFUCallback`` logs one row over the measured steps. The truth of the same run: every forward the
trainer's two models ran in the last measured step, recorded with its inputs and grad mode, replayed
under ``FlopCounterMode`` on eager attention (``tests/helpers/trl_steps.py``: with grad forward + backward,
without grad the forward once; the head on the positions TRL's fused head scores); MFU from it over
the wall time of the measured steps (one sync before, one after).

    python benchmarks/bench_dpo.py                  # GPU: size mid, 3 warm-up + 20 measured steps
    python benchmarks/bench_dpo.py --tiny           # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_accuracy import hf_wall_clock
from common import SIZES, llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from trl_steps import StepTruth, replay  # noqa: E402 - the shared truth of the tests

from mfu_callbacks.hardware import resolve_peak  # noqa: E402
from mfu_callbacks.testing import make_eager, word_tokenizer  # noqa: E402


def preference_data(vocab: int, rows: int, prompt: int, completion: int) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(0)

    def words(count: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, vocab, (count,), generator=generator).tolist())

    return [
        {"prompt": words(prompt), "chosen": words(completion), "rejected": words(completion)}
        for _ in range(rows)
    ]


def run(size: str, warmup: int, measured: int, peak_tflops: float | None) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mfu_callbacks.transformers import MFUCallback

    _, _, _, _, _, vocab, seq_len, pairs = SIZES[size]
    pairs = max(pairs // 2, 1)  # each pair is two sequences (chosen and rejected)
    prompt = completion = (
        seq_len // 2 - 1
    )  # + the end-of-sequence token: seq_len tokens or fewer per sequence
    steps = warmup + measured
    gpu = torch.cuda.is_available()
    clock: dict[str, float] = {}

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=pairs, logging_steps=steps,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not gpu, bf16=gpu,
        gradient_checkpointing=False, max_length=None,
    )  # fmt: skip
    callback = MFUCallback(warmup_steps=warmup, peak_tflops=peak_tflops)
    trainer = DPOTrainer(
        model=llama(size), ref_model=llama(size), args=config,
        train_dataset=Dataset.from_list(preference_data(vocab, pairs * steps, prompt, completion)),
        processing_class=word_tokenizer(vocab), callbacks=[callback, hf_wall_clock(warmup, measured, clock)],
    )  # fmt: skip
    truth = StepTruth(trainer.model, trainer.ref_model)
    trainer.add_callback(truth)
    trainer.train()
    truth.remove()
    for model in (trainer.model, trainer.ref_model):
        make_eager(model)  # FlopCounterMode cannot count SDPA with grouped-query attention on CUDA
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
        truth_step = sum(replay(call) for call in truth.steps[-1])
    row = next(row for row in trainer.state.log_history if "loss" in row)
    logged_step = row["tflops_per_gpu"] * row["step_time"] * 1e12 if "tflops_per_gpu" in row else float("nan")
    resolved = resolve_peak(
        torch.device("cuda" if gpu else "cpu"), "bf16" if gpu else "fp32", override_tflops=peak_tflops
    )
    peak = resolved.flops if resolved is not None else float("nan")
    truth_mfu = truth_step * measured / (clock["end"] - clock["begin"]) / peak
    return {
        "run": f"DPO full, separate reference ({size})",
        "sequences per step": 2 * pairs,
        "tokens per sequence": truth.steps[-1][0].kwargs["input_ids"].shape[1],
        "logged model TFLOP/step": logged_step / 1e12,
        "truth model TFLOP/step": truth_step / 1e12,
        "FLOPs ratio": logged_step / truth_step,
        "logged mfu": row.get("mfu", float("nan")),
        "truth mfu": truth_mfu,
        "mfu ratio": row.get("mfu", float("nan")) / truth_mfu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", choices=list(SIZES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="needed on a CPU")
    parser.add_argument(
        "--tiny", action="store_true", help="size tiny, 2 + 3 steps, peak 1 TFLOP/s: a CPU check"
    )
    args = parser.parse_args()
    if args.tiny:
        args.size, args.warmup, args.measured = "tiny", 2, 3
        args.peak_tflops = args.peak_tflops or 1.0
    torch.manual_seed(0)
    result = run(args.size, args.warmup, args.measured, args.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, torch {torch.__version__}\n")
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in result.values()) + " |")


if __name__ == "__main__":
    main()
