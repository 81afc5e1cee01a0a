"""The attention windows' former import path: ``attention_windows`` is their module.

Kept only for ``tests/test_step_counts.py``, which still imports ``Window`` from here; delete this
module once that test imports ``AttentionWindow`` from ``attention_windows``.
"""

from __future__ import annotations

from .attention_windows import AttentionWindow as Window

__all__ = ["Window"]
