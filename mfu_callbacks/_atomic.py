"""Files that readers see whole: written beside their target, then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(target: Path, document: Any, *, durable: bool = True) -> Path:
    """Write ``document`` as JSON to ``target`` (its folder created if needed); return ``target``."""
    return write_text(target, json.dumps(document, indent=1, allow_nan=False) + "\n", durable=durable)


def write_text(target: Path, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` to ``target`` (its folder created if needed); return ``target``.

    Written to a temporary file in the same folder, then renamed over ``target``: a reader sees the
    previous complete file or the new one, never half of one. ``durable`` syncs the file to disk
    before the rename (an fsync: milliseconds, so not on a path that runs at every log).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from CI artifact uploaders
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
