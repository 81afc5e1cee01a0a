"""Callbacks must never break training: an internal error is logged once, then the callback goes quiet."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("mfu_callbacks")
T = TypeVar("T")

# What to do about a failure, by the kind of error (the first that matches); the fallback follows.
_FIXES: tuple[tuple[str, str], ...] = (
    (
        "ModelIntrospectionError",
        "pass forward=fn(model, batch) returning the loss, built of torch operations that run on the meta device",
    ),
    (
        "BatchError",
        "pass token_counter=fn(batch) returning a dict with 'input_ids' (and 'attention_mask')",
    ),
)
_FALLBACK_FIX = (
    "read the traceback logged by 'mfu_callbacks': if it ends in a token_counter= or forward= you passed, "
    "fix that function; otherwise report it to mfu-callbacks with that traceback"
)


class Guard:
    """Runs callback work; the first exception disables all further work and is logged with its traceback."""

    def __init__(self, owner: str, stops: str = "measuring MFU") -> None:
        self.owner = owner
        self.stops = stops  # what goes quiet after a failure, for the log line
        self.failed = False
        # Why it went quiet and what the user can do about it, in one line each (None while it runs).
        # Text only: keeping the exception would keep its traceback's frames (and their tensors) alive.
        self.reason: str | None = None
        self.fix: str | None = None

    def _note(self, error: Exception) -> None:
        self.failed = True
        self.reason = f"{self.stops} stopped after an internal error: {type(error).__name__}: {error}"
        names = {kind.__name__ for kind in type(error).__mro__}
        self.fix = next((fix for name, fix in _FIXES if name in names), _FALLBACK_FIX)

    def run(
        self, function: Callable[..., T], *args: Any, default: T | None = None, **kwargs: Any
    ) -> T | None:
        if self.failed:
            return default
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - training goes on whatever went wrong here
            self._note(error)
            logger.exception(
                "%s stopped %s after an internal error; training continues unaffected", self.owner, self.stops
            )
            return default
