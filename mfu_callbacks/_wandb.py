"""Moved to :mod:`mfu_callbacks.runs.wandb`; this path serves ``_session.py`` until it imports from there."""

from .runs.wandb import active_run, describe_run, log_breakdown, run_config, summarize_run  # noqa: F401
