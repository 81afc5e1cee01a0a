"""Moved to :mod:`mfu_callbacks.runs.wandb`; this path serves ``_session.py`` until it imports from there."""

from typing import Any

from .runs.wandb import active_run, describe_run, log_breakdown, summarize_run  # noqa: F401


def run_config(*_: Any) -> dict[str, Any]:
    """Nothing beyond the run summary's setup, which the session already puts in the config: the W&B
    config is the setup and the versions (``runs.wandb.run_config``)."""
    return {}
