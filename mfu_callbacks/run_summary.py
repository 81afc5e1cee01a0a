"""Moved to :mod:`mfu_callbacks.runs.summary`; this path serves ``_session.py`` until it imports from there."""

from .runs.summary import SummaryWriter, describe_setup, library_versions  # noqa: F401
