"""Reading a file a person hands the command line, with limits: its size before it is read, its text,
and JSON's nesting depth and integer length, so that a hostile or broken file is one clear error.

Every command reads its inputs through here (configs, run summaries, Trainer states, W&B records,
CSV logs). ``InputFileError`` names the file, what is wrong and what was expected. Only the standard
library is imported: the command line's help stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_MB_ENV = "MFU_CLI_MAX_MB"
DEFAULT_MAX_MB = 256  # a Trainer state logged every step for 100,000 steps is about 30 MB
MAX_DEPTH = 64  # configs, summaries and Trainer states nest a handful of levels
# Python's float stops near 1.8e308: a longer integer cannot become a number any reader uses.
MAX_INT_DIGITS = 308


class InputFileError(ValueError):
    """A file that cannot be read as what was expected: the message is one line naming the file."""


def max_bytes() -> int:
    """The largest input read (``MFU_CLI_MAX_MB`` megabytes, default 256)."""
    text = os.environ.get(MAX_MB_ENV, "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_MAX_MB
    except ValueError:
        megabytes = DEFAULT_MAX_MB
    return int(megabytes * 1e6) if 0 < megabytes < 1e9 else DEFAULT_MAX_MB * 1_000_000


def check_size(path: Path, expected: str) -> int:
    """The file's size in bytes, checked against the limit before anything is read."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InputFileError(f"cannot read {path} ({_reason(error)}): {expected}") from None
    limit = max_bytes()
    if size > limit:
        raise InputFileError(
            f"{path} is {size / 1e6:,.0f} MB, more than the {limit / 1e6:,.0f} MB read at most: {expected}; "
            f"if it is one, raise the limit with {MAX_MB_ENV}={int(size / 1e6) + 1}"
        )
    return size


def read_text(path: Path, expected: str) -> str:
    """The file's UTF-8 text; an empty, binary or oversized file raises ``InputFileError``."""
    if check_size(path, expected) == 0:
        raise InputFileError(f"{path} is empty: {expected}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputFileError(f"cannot read {path} ({_reason(error)}): {expected}") from None
    if b"\x00" in data:
        raise InputFileError(f"{path} is binary, not text: {expected}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"{path} is not UTF-8 text: {expected}") from None


def load_json(path: Path, expected: str, *, allow_nan: bool = False) -> Any:
    """The JSON document in ``path``, read within the limits (see :func:`parse_json`)."""
    return parse_json(read_text(path, expected), str(path), expected, allow_nan=allow_nan)


def parse_json(text: str, source: str, expected: str, *, allow_nan: bool = False) -> Any:
    """``text`` as JSON: integers of at most ``MAX_INT_DIGITS`` digits, at most ``MAX_DEPTH`` levels, and
    NaN or Infinity only where ``allow_nan`` (a Trainer state logs a NaN loss; our own files never hold one).

    Raises ``InputFileError``; a cut-off document (as when read while being written) says so.
    """
    try:
        document = json.loads(
            text, parse_int=_bounded_int, parse_constant=float if allow_nan else _refused_constant
        )
    except _Refused as refused:
        raise InputFileError(f"{source} holds {refused}: {expected}") from None
    except RecursionError:
        raise InputFileError(f"{source} nests deeper than {MAX_DEPTH} levels: {expected}") from None
    except json.JSONDecodeError as error:
        if error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string"):
            raise InputFileError(
                f"{source} is cut off: its JSON ends early (line {error.lineno}), as when a file is read "
                f"while being written; {expected}"
            ) from None
        raise InputFileError(f"cannot read {source} as JSON ({_reason(error)}): {expected}") from None
    if _depth_over(document, MAX_DEPTH):
        raise InputFileError(f"{source} nests deeper than {MAX_DEPTH} levels: {expected}")
    return document


class _Refused(ValueError):
    """A value the reader refuses, described for the message."""


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(digits.lstrip('-'))} digits, more than any number can have")
    return int(digits)


def _refused_constant(name: str) -> float:
    raise _Refused(f"{name}, which is not a number JSON allows")


def _depth_over(document: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels (walked without recursion)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value  # type: ignore[assignment]
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
