"""The plan names ``_step_counts.py`` imports by this path (they live in ``counting/plans.py``; the face,
``mfu_callbacks.flops``, exports them too)."""

from .counting.plans import Group, Plan, constant_plan, whole_plan

__all__ = ["Group", "Plan", "constant_plan", "whole_plan"]
