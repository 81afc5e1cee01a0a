"""Weights & Biases, when the framework already started a run: config, metric axes, run summary.

Never imports wandb itself: the frameworks' W&B loggers do, and a run exists only then.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..metrics import HFU_LAST_STEP, MFU_LAST_STEP, MFU_STATUS, NUMERIC_METRICS

if TYPE_CHECKING:
    from .._status import Status
    from ..attribution import Breakdown

CONFIG_KEY = "mfu_callbacks"
# Logged for what they tell a reader of the row or a script, not as curves: hidden from W&B's default
# charts (still in the run's history, and shown when added to a panel by hand).
HIDDEN_METRICS = (MFU_STATUS, MFU_LAST_STEP, HFU_LAST_STEP)
SUMMARY_PREFIX = "mfu_run/"


def active_run() -> Any | None:
    """The current W&B run, or None when wandb was never imported or no run is active."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def run_config(setup: Mapping[str, Any], versions: Mapping[str, str]) -> dict[str, Any]:
    """What the run's config says about how MFU was computed, under ``mfu_callbacks``: the run summary's
    setup (``summary.describe_setup``: the same keys, written once) and the library versions."""
    return {**setup, "versions": dict(versions)}


def describe_run(run: Any, config: Mapping[str, Any], metric_prefix: str, step_metric: str | None) -> None:
    """Record how MFU was computed, and plot the metrics against the framework's global step."""
    run.config.update({CONFIG_KEY: dict(config)}, allow_val_change=True)
    for name in (*NUMERIC_METRICS, MFU_STATUS):
        options: dict[str, Any] = {"hidden": True} if name in HIDDEN_METRICS else {}
        if step_metric:
            options["step_metric"] = step_metric
        run.define_metric(metric_prefix + name, **options)


def summarize_run(
    run: Any, summary: Mapping[str, float], diagnoses: Iterable[Any] = (), status: Status | None = None
) -> None:
    """The run's means after warm-up (token- and time-weighted, not a mean of logged points), and
    whether MFU was measured: ``mfu_run/status`` (a code of ``metrics.MFUStatus``) with its reason and fix."""
    for name, value in summary.items():
        run.summary[SUMMARY_PREFIX + name] = value
    if status is not None:
        run.summary[SUMMARY_PREFIX + "status"] = int(status.code)
        run.summary[SUMMARY_PREFIX + "status_name"] = status.name
        if not status.measuring:
            run.summary[SUMMARY_PREFIX + "status_reason"] = status.reason
            run.summary[SUMMARY_PREFIX + "status_fix"] = status.fix
    for diagnosis in diagnoses:
        key = f"mfu_diagnosis/{getattr(diagnosis, 'id', 'unknown')}"
        run.summary[key] = str(getattr(diagnosis, "message", diagnosis))
        if getattr(diagnosis, "mfu_cost", None) is not None:
            run.summary[key + "/mfu_cost"] = diagnosis.mfu_cost


def log_breakdown(run: Any, breakdown: Breakdown) -> None:
    """The profiled step's time by bucket: a table and a bar chart, and the top advice in the summary."""
    wandb = sys.modules["wandb"]
    rows = [
        [
            b.name,
            1e3 * b.seconds,
            b.seconds / breakdown.step_seconds if breakdown.step_seconds else 0.0,
            b.tflops,
        ]
        for b in breakdown.buckets
    ]
    table = wandb.Table(columns=["bucket", "ms_per_step", "share", "tflops"], data=rows)
    run.log(
        {
            "mfu_profile/breakdown": table,
            "mfu_profile/breakdown_chart": wandb.plot.bar(
                table, "bucket", "ms_per_step", title="Where the step time goes"
            ),
        }
    )
    run.summary["mfu_profile/step_seconds"] = breakdown.step_seconds
    for rank, advice in enumerate(breakdown.advice[:3], start=1):
        run.summary[f"mfu_profile/advice_{rank}"] = (
            f"{advice.bucket}: MFU {advice.mfu_if_fixed:.1%} (+{advice.mfu_gain:.1%}): {advice.change}"
        )
