"""The profiled steps' former import path: ``_profiled_steps`` is their module.

Kept only for ``meter.py``, which still imports ``ProfileWindow`` from here; delete this module once it
imports ``ProfiledSteps`` from ``_profiled_steps``.
"""

from __future__ import annotations

from ._profiled_steps import ProfiledSteps as ProfileWindow

__all__ = ["ProfileWindow"]
