"""Callbacks must never break training: an internal error is logged once, then the callback goes quiet."""

from __future__ import annotations

import functools
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
        "ReductionError",
        "call metrics()/summary()/finish() on every rank (each read is a collective), for example not under "
        "`if accelerator.is_main_process:` (read `tracker.latest` there instead); or find the rank that "
        "stopped or died",
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
            self.fail(error)
            return default

    def fail(self, error: Exception) -> None:
        """Go quiet after ``error``, logged with its traceback the first time only."""
        if self.failed:
            return
        self._note(error)
        logger.error(
            "%s stopped %s after an internal error; training continues unaffected",
            self.owner,
            self.stops,
            exc_info=error,
        )


# Every method that framework code calls into (a torch hook, a framework's callback hook, a wrapper
# of a framework method), by module and qualified name: ``entry_point`` adds them, and the fault-injection test
# injects a failure into each, so that a new entry point cannot be left outside the guard.
ENTRY_POINTS: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def entry_point(default: Callable[[], Any] = lambda: None) -> Callable[[F], F]:
    """Run the whole body of a method that framework code calls into behind its owner's guard.

    The owner is the instance (``self.guard``) or its session (``self.session.guard``). An exception
    anywhere in the body is logged once (the first), the owner goes quiet, and the framework gets
    ``default()`` back: training goes on. The body is looked up in ``ENTRY_POINTS`` at each call (tests
    replace it there to inject a failure). A body that holds a metrics read must still reach it on every
    rank: the reads guard themselves (``MeterSession.read``).
    """

    def register(method: F) -> F:
        name = f"{method.__module__}.{method.__qualname__}"
        ENTRY_POINTS[name] = method

        @functools.wraps(method)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return ENTRY_POINTS[name](self, *args, **kwargs)
            except Exception as error:  # noqa: BLE001 - training goes on whatever went wrong here
                owner = getattr(self, "session", self)
                guard = getattr(owner, "guard", None)
                if isinstance(guard, Guard):
                    guard.fail(error)
                else:
                    logger.error("%s failed; training continues unaffected", name, exc_info=error)
                return default()

        guarded.__entry_point__ = name  # type: ignore[attr-defined]
        return guarded  # type: ignore[return-value]

    return register
