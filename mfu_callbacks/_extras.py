"""An integration imported without its framework says which extra installs it."""

from __future__ import annotations


def missing_extra(error: ImportError, integration: str, extra: str) -> ImportError:
    """The error to raise from ``integration`` when importing its framework failed: the original
    reason, then the install command (same class and module name, so ``except ImportError`` and
    ``error.name`` still work)."""
    message = f"{integration} needs the '{extra}' extra ({error}): pip install \"mfu-callbacks[{extra}]\""
    return type(error)(message, name=error.name, path=error.path)
