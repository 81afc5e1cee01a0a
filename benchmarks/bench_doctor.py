"""How close ``mfu-callbacks doctor``'s predicted step is to a measured one.

For each configuration of the GPU table (a ~0.7B Llama-style model: hidden 2048, 12 layers, 16
heads, MLP 5440, vocabulary 32000, 4 x 2048 tokens, bf16 mixed precision): full fine-tuning, LoRA
r=16 on all linear layers, and full fine-tuning on packed rows (one row of 4 documents, restarting
position_ids), it runs doctor's examination (the same code as the command line) and then trains
the real model in a plain loop (SDPA attention, autocast bf16 over fp32 weights, AdamW fused, 5
warm-up steps, then ``--steps`` measured steps between two synchronizes). Printed: predicted and
measured ms per step, their ratio, and doctor's parts (which are measured, which modelled).
Target on an H100: predicted within 15% of measured.

    python benchmarks/bench_doctor.py                 # on a GPU: about 2 minutes on an H100
    python benchmarks/bench_doctor.py --smoke         # CPU, a tiny model: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mfu_callbacks.cli.doctor import ROUNDS, diagnose
from mfu_callbacks.doctor import Examination
from mfu_callbacks.testing import causal_lm

SIZES = {  # hidden, layers, heads, intermediate, vocab, rows, length
    "0.7b": (2048, 12, 16, 5440, 32000, 4, 2048),
    "tiny": (64, 2, 4, 128, 256, 2, 32),
}
CONFIGURATIONS = {"full": (0, False), "lora": (16, False), "packed": (0, True)}  # LoRA rank, packed


def config_file(size: str, folder: Path) -> Path:
    hidden, layers, heads, intermediate, vocab, _, length = SIZES[size]
    model = causal_lm(
        hidden=hidden, layers=1, heads=heads, intermediate=intermediate, vocab=vocab, max_positions=length
    )
    config = model.config
    config.num_hidden_layers = layers
    path = folder / f"{size}.json"
    path.write_text(config.to_json_string())
    return path


def predict(path: Path, size: str, lora_rank: int, packed: bool, device: str, repeats: int) -> Examination:
    *_, rows, length = SIZES[size]
    args = argparse.Namespace(
        config=str(path),
        batch_size=rows,
        seq_len=length,
        dtype="bf16",
        lora_rank=lora_rank,
        lora_targets="",
        packed=packed,
        device=device,
        repeats=repeats,
        rounds=ROUNDS,
        peak_tflops=None if device == "cuda" else 1.0,
    )
    return diagnose(args)


def batch(size: str, packed: bool, device: torch.device) -> dict[str, torch.Tensor]:
    *_, vocab, rows, length = SIZES[size]
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(device)
    if not packed:
        return {"input_ids": ids, "labels": ids}
    positions = torch.arange(length, device=device).repeat(rows)[None]
    flat = ids.reshape(1, -1)
    return {"input_ids": flat, "labels": flat, "position_ids": positions}


def measure(size: str, lora_rank: int, packed: bool, device: torch.device, steps: int) -> float:
    """Mean seconds of a plain training step, after 5 warm-up steps."""
    hidden, layers, heads, intermediate, vocab, _, length = SIZES[size]
    with device:  # weights drawn on the device: a 0.7B model initialises in seconds, not a minute
        model = causal_lm(
            hidden=hidden,
            layers=layers,
            heads=heads,
            intermediate=intermediate,
            vocab=vocab,
            max_positions=length,
            lora_rank=lora_rank or None,
        )
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type == "cuda")
    inputs = batch(size, packed, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="measured training steps")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per shape in doctor")
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny model on the CPU: checks the script runs"
    )
    args = parser.parse_args()
    size = "tiny" if args.smoke else "0.7b"
    if args.smoke:
        torch.set_num_threads(1)
        args.steps, args.repeats = 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = config_file(size, Path(folder))
        for name in args.configs.split(","):
            lora_rank, packed = CONFIGURATIONS[name]
            begin = time.perf_counter()
            examination = predict(path, size, lora_rank, packed, device.type, args.repeats)
            doctor_seconds = time.perf_counter() - begin
            measured = measure(size, lora_rank, packed, device, args.steps)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model and its optimizer state are gone: hand their memory back
            predicted = examination.predicted_seconds
            results[name] = {
                **examination.to_dict(),
                "measured_seconds": measured,
                "doctor_wall_seconds": doctor_seconds,
            }
            parts = ", ".join(
                f"{part} {value['seconds'] * 1e3:.1f} ({value['how']})"
                for part, value in examination.to_dict()["parts"].items()
            )
            ceiling = examination.mfu_at(examination.floor_seconds)
            print(
                f"{name:<7} predicted {predicted * 1e3:8.2f} ms  measured {measured * 1e3:8.2f} ms  "
                f"ratio {predicted / measured:.3f}  floor {examination.floor_seconds * 1e3:.1f} ms"
                + (f" (MFU ceiling {ceiling:.1%})" if ceiling is not None else "")
                + f"  doctor took {doctor_seconds:.1f} s\n        parts (ms): {parts}",
                flush=True,
            )
    print(f"device: {results[next(iter(results))]['device']}; target: ratio within 0.85-1.15")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
