"""The ``mfu-callbacks`` command line: plan a run's FLOPs and time its step before starting it, plot and compare runs after.

examples:
  mfu-callbacks estimate --config config.json --seq-len 4096 --batch-size 8 --gpu h100
  mfu-callbacks estimate --config config.json --seq-len 2048 --batch-size 4 --lora-rank 16 --lora-targets q_proj,v_proj
  mfu-callbacks doctor --config config.json --seq-len 2048 --batch-size 4
  mfu-callbacks plot wandb/offline-run-20261124_120000-abc123 -o mfu.png
  mfu-callbacks compare runs/main runs/pr --max-drop 2

With --json, every command prints its result, or its error ({"exit_code": 2, "error": ...}), as JSON
on stdout. mfu-callbacks COMMAND --help describes each command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path

from .._version import __version__
from . import estimate, plot
from ._common import EXIT_USAGE, CliError, Parser, reason

__all__ = ["main"]

_TRACEBACK_ENV = "MFU_CLI_TRACEBACK"
# Commands whose modules import torch: their arguments are added only when they run, so that
# `mfu-callbacks --help` and `--version` start in a fraction of a second. The listing shows these
# summaries (tests check they match the ones the modules register).
_LAZY_COMMANDS = {
    "compare": "compare runs' MFU and throughput with confidence intervals; gate CI on a drop",
    "doctor": "time each matmul shape, attention and the optimizer of a config's step on this device",
}
# reStructuredText in docstrings shown as help: ``code``, **bold**, :func:`name`.
_RST_MARKUP = re.compile(r"``(.+?)``|\*\*(.+?)\*\*|:\w+:`(.+?)`", re.DOTALL)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    wants_json = "--json" in argv  # before parsing: a bad command line is answered in JSON too
    try:
        args = _parser(_command_of(argv)).parse_args(argv)
        wants_json = bool(getattr(args, "json", False))
        status = args.handler(args)
    except CliError as error:
        return _fail(str(error), wants_json)
    except (RecursionError, MemoryError, OverflowError) as error:  # an input past what was checked
        return _fail(f"the input is too large or too deeply nested to process ({reason(error)})", wants_json)
    except Exception as error:  # noqa: BLE001 - a CI gate reads exit 1 as "dropped": never that for a bug
        if os.environ.get(_TRACEBACK_ENV):
            raise
        where = traceback.extract_tb(error.__traceback__)[-1]
        return _fail(
            f"internal error, {type(error).__name__}: {reason(error)} (at {Path(where.filename).name}:"
            f"{where.lineno}; {_TRACEBACK_ENV}=1 prints the traceback for a bug report)",
            wants_json,
        )
    return status if isinstance(status, int) else 0


def _fail(message: str, wants_json: bool) -> int:
    """The error as one line on stderr (and as a JSON object on stdout with --json); exit code 2."""
    message = " ".join(message.split())
    print(f"mfu-callbacks: error: {message}", file=sys.stderr)
    if wants_json:
        print(json.dumps({"exit_code": EXIT_USAGE, "error": message}))
    return EXIT_USAGE


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; the arguments of a lazily added command only when it is ``command``."""
    parser = Parser(
        prog="mfu-callbacks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    estimate.add_parser(commands)
    plot.add_parser(commands)
    for name, summary in _LAZY_COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=summary, add_help=False)
        elif name == "compare":
            from . import compare

            compare.add_parser(commands)
        else:
            from . import doctor

            doctor.add_parser(commands)
    _plain_help(parser)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def _plain(text: str | None) -> str | None:
    """Help text without reStructuredText markup (docstrings double as help)."""
    if not text:
        return text
    return _RST_MARKUP.sub(lambda match: next(group for group in match.groups() if group is not None), text)


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Strip the markup from a parser's texts and its subcommands', recursively."""
    parser.description, parser.epilog = _plain(parser.description), _plain(parser.epilog)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = _plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = _plain(choice.help)
            for sub in action.choices.values():
                _plain_help(sub)
