"""What every command shares: the one-line error, the parser that raises it, and the arguments of the
commands that plan a model's step from its config (``estimate``, ``doctor``).

Only the standard library is imported here: ``mfu-callbacks --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

EXIT_USAGE = 2
# A count on the command line (tokens in a row, rows, a rank) beyond this is a typo: 2**31, past any
# context length; products of such counts still fit the int64 sizes torch's meta tensors take.
MAX_COUNT = 2**31
_REASON_CHARS = 300  # of a library's error message, quoted in ours


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line, as every other error is (not usage, then the error)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see: {self.prog} --help)")


def reason(error: BaseException) -> str:
    """A library's error message on one line, cut to a readable length."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


@dataclass(frozen=True)
class ModelArguments:
    """The arguments of a command that plans a model's step (:func:`add_model_arguments`), as plain values."""

    config: str  # the path of a Hugging Face config.json
    seq_len: int
    batch_size: int
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: str = ""  # comma-separated linear layer names; empty: all linear layers

    @classmethod
    def of(cls, args: argparse.Namespace) -> ModelArguments:
        """The values ``add_model_arguments`` put in ``args``, checked (``CliError`` names the flag)."""
        arguments = cls(args.config, args.seq_len, args.batch_size, args.lora_rank, args.lora_targets)
        arguments.check()
        return arguments

    def check(self) -> None:
        """Counts within range and LoRA targets only with a rank; ``CliError`` names the flag."""
        for flag, value, meaning in (
            ("--seq-len", self.seq_len, "tokens in one row"),
            ("--batch-size", self.batch_size, "rows in one optimizer step of one GPU"),
        ):
            if value <= 0:
                raise CliError(f"{flag} must be positive (got {value}): the {meaning}")
            if value > MAX_COUNT:
                raise CliError(f"{flag} must be at most {MAX_COUNT:,} (got {value:,}): the {meaning}")
        if self.lora_rank < 0:
            raise CliError(
                f"--lora-rank must be positive (got {self.lora_rank}): the LoRA rank, e.g. 16; leave it out "
                "for full fine-tuning"
            )
        if self.lora_rank > MAX_COUNT:
            raise CliError(
                f"--lora-rank must be at most {MAX_COUNT:,} (got {self.lora_rank:,}): the LoRA rank, e.g. 16"
            )
        if self.lora_targets and not self.lora_rank:
            raise CliError("--lora-targets needs --lora-rank (the LoRA rank, e.g. --lora-rank 16)")


class _DeprecatedSpelling(argparse.Action):
    """Stores the value under the option's one spelling; an old spelling also prints a deprecation note."""

    def __init__(self, *args: Any, old: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old = old

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string in self.old:
            print(
                f"mfu-callbacks: warning: {option_string} is deprecated and will be removed; use "
                f"{self.option_strings[0]}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every command that plans a model's step from its config (estimate, doctor)."""
    parser.add_argument("--config", required=True, help="a Hugging Face config.json (read locally)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens in one row (sequence), e.g. 2048")
    parser.add_argument(
        "--batch-size",
        type=int,
        required=True,
        help="rows in one optimizer step of one GPU (micro-batch x gradient accumulation)",
    )
    parser.add_argument(
        "--lora-rank",
        "--lora-r",
        dest="lora_rank",
        type=int,
        default=0,
        action=_DeprecatedSpelling,
        old=("--lora-r",),
        help="LoRA rank, e.g. 16 (default 0: full fine-tuning); --lora-r is a deprecated spelling",
    )
    parser.add_argument(
        "--lora-targets",
        default="",
        help="comma-separated names of the linear layers that get adapters (default: all linear layers)",
    )
    parser.add_argument("--json", action="store_true", help="print the result, or the error, as JSON")
