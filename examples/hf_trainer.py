"""MFU beside the loss in a Hugging Face Trainer run: one added line, ``callbacks=[MFUCallback()]``.

python examples/hf_trainer.py --peak-tflops 1            # CPU: a tiny model, well under a minute
python examples/hf_trainer.py --hidden-size 2048 --layers 16 --heads 16 --seq-len 2048 --bf16   # GPU
python examples/hf_trainer.py --lora --wandb              # LoRA through PEFT, logged to W&B
"""

from __future__ import annotations

import argparse
import os
import tempfile

from common import RandomTokens, add_model_arguments, build_hf_model, pad_batch
from transformers import Trainer, TrainingArguments

from mfu_callbacks.transformers import MFUCallback


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument(
        "--output-dir", help="where the Trainer and the run summary write (default: a new temporary folder)"
    )
    args = parser.parse_args()
    if args.output_dir is None:  # a fresh folder per run: runs never overwrite each other's summaries
        args.output_dir = tempfile.mkdtemp(prefix="mfu-hf-trainer-")

    model = build_hf_model(args)
    data = RandomTokens(
        args.steps * args.batch_size * args.gradient_accumulation_steps, args.seq_len, args.vocab_size
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=1e-3,
        logging_steps=5,
        bf16=args.bf16,
        report_to=["wandb"] if args.wandb else [],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not __import__("torch").cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=pad_batch,
        callbacks=[MFUCallback(peak_tflops=args.peak_tflops)],
    )
    trainer.train()
    print(f"{'step':>5} {'loss':>8} {'mfu':>7} {'hfu':>7} {'TFLOP/s':>8} {'tokens/s':>9} {'padding':>8}")
    for row in trainer.state.log_history:
        if "loss" in row and "tflops_per_gpu" in row:
            mfu = f"{row['mfu']:.4f}" if "mfu" in row else "    n/a"
            hfu = f"{row['hfu']:.4f}" if "hfu" in row else "    n/a"
            print(
                f"{row['step']:>5} {row['loss']:>8.4f} {mfu:>7} {hfu:>7} {row['tflops_per_gpu']:>8.4f} "
                f"{row['tokens_per_sec']:>9.0f} {row['padding_fraction']:>8.1%}"
            )
    state_file = os.path.join(args.output_dir, "trainer_state.json")
    trainer.state.save_to_json(state_file)
    print(f"run summary: {os.path.join(args.output_dir, 'mfu_summary.json')}")
    print(f"curves: mfu-callbacks plot {state_file} -o mfu.png")


if __name__ == "__main__":
    main()
