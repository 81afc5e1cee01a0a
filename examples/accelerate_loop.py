"""A hand-written Accelerate loop; MFU comes from one added line, ``MFUTracker(accelerator, model)``.

python examples/accelerate_loop.py --peak-tflops 1
torchrun --nproc_per_node 2 examples/accelerate_loop.py --peak-tflops 1      # two CPU processes (gloo)
accelerate launch --config_file configs/accelerate.yaml examples/accelerate_loop.py   # two GPUs
python examples/accelerate_loop.py --hidden-size 2048 --layers 16 --heads 16 --seq-len 2048 --bf16 --wandb
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from common import RandomTokens, add_model_arguments, build_model, pad_batch
from torch.utils.data import DataLoader

from mfu_callbacks.accelerate import MFUTracker


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    args = parser.parse_args()

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # under torchrun on CPUs this makes it a gloo process group
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "no",
        log_with="wandb" if args.wandb else None,
    )
    if args.wandb:
        accelerator.init_trackers("mfu-callbacks-example")
    model = build_model(args)
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-3)
    data = RandomTokens(
        args.steps * args.batch_size * args.gradient_accumulation_steps, args.seq_len, args.vocab_size
    )
    loader = DataLoader(data, batch_size=args.batch_size, collate_fn=pad_batch)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = MFUTracker(accelerator, model, peak_tflops=args.peak_tflops, log_interval=5)  # the added line

    model.train()
    if accelerator.is_main_process:
        print(f"training on {accelerator.num_processes} process(es), {accelerator.device.type}")
    for step, batch in enumerate(loader):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        accelerator.log({"train/loss": loss.item()}, step=step)
        if tracker.latest and accelerator.is_main_process and (step + 1) % 5 == 0:
            m = tracker.latest
            mfu = f"{m['train/mfu']:.4f}" if "train/mfu" in m else "n/a"
            print(
                f"step {step + 1:>4}  loss {loss.item():.4f}  mfu {mfu}  "
                f"TFLOP/s {m['train/tflops_per_gpu']:.4f}  tokens/s {m['train/tokens_per_sec']:.0f}"
            )
    accelerator.end_training()


if __name__ == "__main__":
    main()
