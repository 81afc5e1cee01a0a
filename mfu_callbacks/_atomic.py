"""Files that readers see whole: written beside their target, then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(target: Path, document: Any) -> Path:
    """Write ``document`` as JSON to ``target`` (its folder created if needed); return ``target``.

    Written to a temporary file in the same folder, then renamed over ``target``: a reader sees the
    previous complete file or the new one, never half of one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1, allow_nan=False)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from CI artifact uploaders
        with os.fdopen(handle, "w") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
