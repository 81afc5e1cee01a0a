"""Moved to :mod:`mfu_callbacks.runs.report`; this path serves ``_session.py`` until it imports from there."""

from .runs.report import format_report  # noqa: F401
