"""GRPO with generation inside the step on a GPU: logged MFU, model FLOPs and the phase split against
an independent truth of the same run.

TRL's ``GRPOTrainer`` (transformers' ``generate``, beta 0, or ``--beta``: a reference model TRL builds from
the policy's path) on a Llama-style model (hidden 1024, 8 layers, bf16 weights, eager attention so that
FlopCounterMode sees every matmul), 8 prompts x 4 generations a step, every completion exactly
``--new-tokens`` long (end of sequence suppressed until then) and every prompt ``--prompt-tokens`` long:
each step runs the same FLOPs. The truth, from the same run, on one extra step after the measured ones
(the same shapes):

- hardware FLOPs: FlopCounterMode over the whole optimizer step (generation, scoring and training), with
  TRL's chunked log-prob head counted as it runs (its logits recomputed in the backward included);
- model FLOPs: FlopCounterMode over the ``generate`` call, plus each forward of the step's models outside
  it replayed with an unfused head on the positions TRL's head scores (the completion's, on CUDA): with
  grad forward and backward for the trainable parameters, without grad the forward once;
- time: the wall clock of the measured steps (a sync before the first and after the last), and the
  wall clock of each ``generate`` call (a sync on each side: seconds-long calls, so they cost little).

    python benchmarks/bench_grpo.py                 # H100/H200: about 2 minutes
    python benchmarks/bench_grpo.py --tiny          # CPU check of the script (tiny model, a few tokens)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from typing import Any

import torch
from common import sync
from torch.utils.flop_counter import FlopCounterMode

from mfu_callbacks.hardware import memory_bandwidth, resolve_peak
from mfu_callbacks.testing import causal_lm, word_tokenizer


def _addmm_flops(self_shape, a_shape, b_shape, *rest, out_shape=None, **kwargs) -> int:
    """torch's own formula, taking ``addmm(..., out_dtype=)`` too (TRL's chunked log-prob kernel on CUDA
    passes it; torch 2.11's FlopCounterMode reads it as the output's shape and raises)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# On a CPU the head accumulates its gradients with ``addmm_``, for which FlopCounterMode has no formula.
ADDMM_WITH_OUT_DTYPE = {torch.ops.aten.addmm: _addmm_flops, torch.ops.aten.addmm_: _addmm_flops}

# hidden, layers, heads, kv_heads, intermediate, vocab
MODEL = {"mid": (1024, 8, 16, 8, 2816, 32000), "tiny": (64, 2, 4, 2, 128, 256)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from mfu_callbacks.transformers import MFUCallback

    hidden, layers, heads, kv_heads, intermediate, vocab = MODEL["tiny" if args.tiny else "mid"]
    cuda = torch.cuda.is_available()
    model = causal_lm(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        max_positions=args.prompt_tokens + args.new_tokens + 8,
        attention="eager",
    )
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    if cuda:
        model.to(torch.bfloat16)  # as TRL loads a model by name (dtype "auto"): generation runs in bf16 too
    if args.beta:  # TRL builds the reference model from the policy's path
        path = tempfile.mkdtemp()
        model.save_pretrained(path)
        model = type(model).from_pretrained(path, attn_implementation="eager", dtype=model.dtype)
    measured_from, measured_to = args.warmup, args.warmup + args.measured  # global steps
    clock: dict[str, float] = {}
    generation_seconds: list[float] = []
    truth: dict[str, int] = {}
    # The extra step's forwards outside generate: (model, tensor arguments, grad on).
    passes: list[tuple[torch.nn.Module, dict[str, Any], bool]] = []

    class Truth(TrainerCallback):
        """Wall clock of the measured steps and of each generate call; FlopCounterMode on the last step."""

        def __init__(self) -> None:
            self.mode: FlopCounterMode | None = None
            self.recording = False  # in the extra step, outside generate

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            generate = model.generate

            def timed(*call_args, **call_kwargs):
                measured = measured_from <= state.global_step < measured_to
                if measured:
                    sync()
                    began = time.perf_counter()
                if self.mode is not None:
                    self.recording = False
                    with FlopCounterMode(display=False, custom_mapping=ADDMM_WITH_OUT_DTYPE) as counter:
                        output = generate(*call_args, **call_kwargs)
                    self.recording = True
                    truth["generation"] = truth.get("generation", 0) + counter.get_total_flops()
                else:
                    output = generate(*call_args, **call_kwargs)
                if measured:
                    sync()
                    generation_seconds.append(time.perf_counter() - began)
                return output

            model.generate = timed

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == measured_from:
                sync()
                clock["begin"] = time.perf_counter()
            if state.global_step == measured_to:  # the extra step: counted, not timed
                self.mode = FlopCounterMode(display=False, custom_mapping=ADDMM_WITH_OUT_DTYPE)
                self.mode.__enter__()
                self.recording = True

        def record(self, module, call_args, call_kwargs):
            if self.mode is not None and self.recording:
                kept = {k: v.detach().clone() for k, v in call_kwargs.items() if isinstance(v, torch.Tensor)}
                passes.append((module, kept, torch.is_grad_enabled()))

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == measured_to:
                sync()
                clock["end"] = time.perf_counter()
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                truth["step"] = self.mode.get_total_flops()
                self.mode, self.recording = None, False

    prompts = [
        " ".join(f"w{3 + (i * 7 + j) % (vocab - 3)}" for j in range(args.prompt_tokens)) for i in range(512)
    ]
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=measured_to + 1,
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        logging_steps=measured_to,  # one row, over the measured steps; the truth step comes after it
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        beta=args.beta,
        model_init_kwargs={"attn_implementation": "eager", "dtype": model.dtype},
    )
    callback, watch = MFUCallback(warmup_steps=args.warmup, peak_tflops=args.peak_tflops), Truth()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=word_tokenizer(vocab),
        callbacks=[callback, watch],
    )
    for watched in (trainer.model, trainer.ref_model):
        if watched is not None:
            watched.register_forward_pre_hook(watch.record, with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    truth["model"] = truth["generation"] + sum(_replayed(*call) for call in passes)
    row = next(row for row in trainer.state.log_history if "mfu/generation_time_fraction" in row)
    wall = clock["end"] - clock["begin"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else resolve_peak(torch.device("cuda"), "bf16").flops
    bandwidth = memory_bandwidth(torch.device("cuda")) if cuda else None
    logged_seconds = row["mfu/step_time"]
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "logged": row,
        "logged step flops": row["tflops_per_gpu"] * logged_seconds * 1e12,
        "logged hardware flops": row["hfu"] * logged_seconds * peak,
        "truth step flops": truth["model"],
        "truth hardware flops": truth["step"],
        "truth generation flops": truth["generation"],
        "truth step seconds": wall / args.measured,
        "truth generation fraction": sum(generation_seconds) / wall,
        "truth mfu": truth["model"] * args.measured / wall / peak,
        "truth generation mfu": truth["generation"] * args.measured / sum(generation_seconds) / peak,
        "truth training mfu": (truth["model"] - truth["generation"])
        * args.measured
        / (wall - sum(generation_seconds))
        / peak,
        "truth tokens per sec": args.prompts
        * args.generations
        * args.new_tokens
        * args.measured
        / sum(generation_seconds),
        "bandwidth": bandwidth,
    }


def _replayed(model: torch.nn.Module, kwargs: dict[str, Any], grad: bool) -> int:
    """Model FLOPs of one recorded forward: the backbone on every token, an unfused head on the positions
    TRL's head scores; with grad, the backward for the trainable parameters (nothing forced)."""
    from trl.trainer.utils import _use_triton

    labels = kwargs.get("labels")
    inputs = {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")}
    trainable = [p for p in model.parameters() if p.requires_grad] if grad else []
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        if labels is not None:  # every position but the last, or (Triton) the labelled ones
            hidden = hidden[:, :-1]
            if _use_triton(hidden.device):
                hidden = hidden[labels[:, 1:] != -100]
        logits = model.lm_head(hidden)
        if trainable:
            torch.autograd.grad(logits.float().sum(), trainable, allow_unused=True)
    return counter.get_total_flops()


def table(result: dict[str, Any]) -> str:
    logged = result["logged"]
    rows = [
        ("model FLOPs per step", result["logged step flops"], result["truth step flops"]),
        ("hardware FLOPs per step", result["logged hardware flops"], result["truth hardware flops"]),
        ("generation FLOPs per step", logged["mfu/generation_flops"], result["truth generation flops"]),
        ("step time (s)", logged["mfu/step_time"], result["truth step seconds"]),
        ("mfu", logged["mfu"], result["truth mfu"]),
        ("mfu/generation", logged.get("mfu/generation"), result["truth generation mfu"]),
        ("mfu/training", logged.get("mfu/training"), result["truth training mfu"]),
        (
            "mfu/generation_time_fraction",
            logged["mfu/generation_time_fraction"],
            result["truth generation fraction"],
        ),
        (
            "mfu/generation_tokens_per_sec",
            logged["mfu/generation_tokens_per_sec"],
            result["truth tokens per sec"],
        ),
        ("mfu/generation_bandwidth_utilization", logged.get("mfu/generation_bandwidth_utilization"), None),
        ("TRL's own step_time (s)", logged.get("step_time"), None),
    ]
    lines = ["| quantity | logged | truth | logged / truth |", "|---|---:|---:|---:|"]
    for name, ours, theirs in rows:
        ratio = f"{ours / theirs:.4f}" if ours is not None and theirs else ""
        lines.append(f"| {name} | {_fmt(ours)} | {_fmt(theirs)} | {ratio} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model and a few tokens: checks the script on a CPU"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured ones")
    parser.add_argument("--measured", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="needed on a CPU")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight: above 0, a reference model too")
    args = parser.parse_args()
    if args.tiny:
        args.prompts, args.generations, args.new_tokens, args.prompt_tokens = 2, 2, 6, 8
        args.warmup, args.measured = 1, 2
        args.peak_tflops = args.peak_tflops or 1.0
    result = run(args)
    print(
        f"device: {result['device']}; torch {torch.__version__}; GRPO, {args.prompts} prompts x {args.generations} "
        f"generations x {args.new_tokens} new tokens, prompts of {args.prompt_tokens} tokens, beta {args.beta}; "
        f"{args.warmup} warm-up + {args.measured} measured steps"
    )
    if result["bandwidth"]:
        print(
            f"memory bandwidth (datasheet): {result['bandwidth'][0] / 1e12:.2f} TB/s ({result['bandwidth'][1]})"
        )
    print()
    print(table(result))


if __name__ == "__main__":
    main()
