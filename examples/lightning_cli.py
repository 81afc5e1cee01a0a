"""A LightningCLI script whose MFU callback is switched on from the YAML config.

    python examples/lightning_cli.py fit --config configs/lightning.yaml
    python examples/lightning_cli.py fit --config configs/lightning.yaml --model.lora true
    python examples/lightning_cli.py fit --config configs/lightning.yaml --model.hidden_size 2048 --model.layers 16 \
        --trainer.precision bf16-mixed --trainer.accelerator gpu
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RandomTokens, build_model, pad_batch  # noqa: E402


class TinyCausalLM(L.LightningModule):
    """A Llama-style language model built from a config (nothing downloaded)."""

    def __init__(
        self,
        hidden_size: int = 128,
        layers: int = 2,
        heads: int = 4,
        vocab_size: int = 512,
        seq_len: int = 128,
        lora: bool = False,
        learning_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(
            argparse.Namespace(
                hidden_size=hidden_size,
                layers=layers,
                heads=heads,
                vocab_size=vocab_size,
                seq_len=seq_len,
                lora=lora,
            )
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            (p for p in self.parameters() if p.requires_grad), lr=self.hparams.learning_rate
        )


class RandomTokenData(L.LightningDataModule):
    def __init__(
        self, batch_size: int = 8, seq_len: int = 128, vocab_size: int = 512, size: int = 256
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            RandomTokens(h.size, h.seq_len, h.vocab_size), batch_size=h.batch_size, collate_fn=pad_batch
        )


def main() -> None:
    LightningCLI(TinyCausalLM, RandomTokenData)


if __name__ == "__main__":
    main()
