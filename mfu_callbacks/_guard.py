"""Callbacks must never break training: an internal error is logged once, then the callback goes quiet."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("mfu_callbacks")
T = TypeVar("T")


class Guard:
    """Runs callback work; the first exception disables all further work and is logged with its traceback."""

    def __init__(self, owner: str, stops: str = "measuring MFU") -> None:
        self.owner = owner
        self.stops = stops  # what goes quiet after a failure, for the log line
        self.failed = False

    def run(
        self, function: Callable[..., T], *args: Any, default: T | None = None, **kwargs: Any
    ) -> T | None:
        if self.failed:
            return default
        try:
            return function(*args, **kwargs)
        except Exception:  # noqa: BLE001 - training goes on whatever went wrong here
            self.failed = True
            logger.exception(
                "%s stopped %s after an internal error; training continues unaffected", self.owner, self.stops
            )
            return default
