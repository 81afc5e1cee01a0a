"""What a run leaves behind besides its logged rows: the run summary file (rank 0), the W&B run's
description and summary, and the end-of-run report. ``MeterSession`` owns one per run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from torch import nn

from . import distributed
from ._options import MFUOptions
from ._status import Status
from .attribution import format_breakdown, write_breakdown
from .meter import MFUMeter
from .runs import wandb as _wandb
from .runs.report import format_report
from .runs.summary import SummaryWriter, describe_setup, library_versions


class RunOutputs:
    """The run summary (one line per window, the header when it changes), the W&B run and the report."""

    def __init__(
        self, options: MFUOptions, *, wandb_prefix: str | None = None, wandb_step_metric: str | None = None
    ) -> None:
        """``wandb_prefix``: how the metric names appear in W&B (the framework may add its own prefix);
        ``wandb_step_metric``: the framework's global-step key in W&B, the axis MFU is plotted against."""
        self.options = options
        self._wandb_prefix = options.prefix if wandb_prefix is None else wandb_prefix
        self._wandb_step_metric = wandb_step_metric
        self.summary_dir: str | None = None  # where the run summary (mfu_summary.json) is written
        self.writer: SummaryWriter | None = None  # opened at the first window written
        self.start_run()

    def start_run(self) -> None:
        """A run starts: an interrupted run's file is closed (what it wrote stays)."""
        earlier: SummaryWriter | None = getattr(self, "writer", None)
        if earlier is not None:
            with suppress(Exception):
                earlier.close()
        self.writer = None
        self.wandb_described = False
        self._setup_described: dict[str, Any] | None = None  # the setup, described once per run
        self._summary_status: dict[str, Any] | None = None  # the status the header last said

    def write_summary_to(self, framework_folder: str | os.PathLike[str] | None) -> None:
        """Write the run summary into the ``summary_dir`` option, else the framework's output folder."""
        folder = self.options.summary_dir or framework_folder
        self.summary_dir = str(folder) if folder is not None else None

    # -- the run summary: one line per window, the header when it changes (rank 0) ------------------
    def add_window(
        self,
        meter: MFUMeter,
        model: nn.Module | None,
        status: Status,
        step: int,
        metrics: Mapping[str, float],
        *,
        resumed_at: int | None,
    ) -> None:
        """Append the window (its cost does not grow with the run or the model: the setup is
        described once, at the first window, and again only at checkpoints and at the end)."""
        writer = self._summary_writer(resumed_at)
        if writer is None:
            return
        if self._setup_described is None:
            self._setup_described = setup(meter, model)
        window = meter.last_window
        writer.append(step, metrics, window.totals() if window is not None else None)
        described = status.as_dict()
        if described != self._summary_status:
            writer.write_header(self._setup_described, described, totals=_run_totals(meter))
            self._summary_status = described

    def sync(
        self,
        meter: MFUMeter | None,
        model: nn.Module | None,
        status: Status,
        *,
        resumed_at: int | None,
        close: bool = False,
    ) -> None:
        """Describe the setup as it is now, write the header and make both files durable (a
        checkpoint is being saved, or the run ends)."""
        writer = self._summary_writer(resumed_at, open_if_needed=close)
        if writer is None:
            return
        self._setup_described = setup(meter, model)
        self._summary_status = status.as_dict()
        writer.write_header(self._setup_described, self._summary_status, totals=_run_totals(meter))
        if close:
            writer.close()
            self.writer = None
        else:
            writer.sync()

    def _summary_writer(self, resumed_at: int | None, *, open_if_needed: bool = True) -> SummaryWriter | None:
        """The run summary's writer on rank 0 when a folder is known; opened on first use."""
        if self.summary_dir is None or distributed.rank() != 0:
            return None
        if self.writer is None and open_if_needed:
            self.writer = SummaryWriter(self.summary_dir, resume_after=resumed_at)
        return self.writer

    # -- W&B and the report ---------------------------------------------------------------------------
    def describe_wandb_run(self, meter: MFUMeter, model: nn.Module | None) -> None:
        """The run config says how MFU was measured: the run summary's setup and the library versions."""
        run = _wandb.active_run()
        if run is None:
            return
        self.wandb_described = True
        config = _wandb.run_config(setup(meter, model), library_versions())
        _wandb.describe_run(run, config, self._wandb_prefix, self._wandb_step_metric)

    def report(self, meter: MFUMeter, summary: Mapping[str, float], status: Status) -> None:
        """The end of a measured run (rank 0): the report, the profile breakdown, the W&B summary."""
        diagnoses = meter.diagnostics()
        breakdown = meter.step_breakdown()
        if distributed.rank() != 0:
            return
        if self.options.report:
            text = format_report(
                summary,
                meter.run_flops(),
                meter.peak,
                diagnoses,
                status,
                meter.matmul_dtypes(),
                device=str(meter.device),
            )
            if breakdown is not None:
                text += "\n" + format_breakdown(breakdown)
            elif meter.profile_note:
                text += "\n  " + meter.profile_note
            print(text, flush=True)
        if breakdown is not None and self.summary_dir is not None:
            write_breakdown(breakdown, self.summary_dir)
        run = _wandb.active_run()
        if run is not None:
            _wandb.summarize_run(run, summary, diagnoses, status)
            if breakdown is not None:
                _wandb.log_breakdown(run, breakdown)

    def report_not_measured(self, meter: MFUMeter | None, status: Status) -> None:
        """A run that measured nothing still ends with the report and the W&B summary saying why (rank 0)."""
        if distributed.rank() != 0:
            return
        peak = meter.peak if meter is not None else None
        device = str(meter.device) if meter is not None else None
        if self.options.report:
            print(format_report({}, None, peak, (), status, device=device), flush=True)
        run = _wandb.active_run()
        if run is not None:
            _wandb.summarize_run(run, {}, (), status)


def setup(meter: MFUMeter | None, model: nn.Module | None) -> dict[str, Any]:
    """How the run is measured (the run summary's header and the W&B config); {} without a meter."""
    if meter is None:
        return {}
    return describe_setup(
        peak=meter.peak,
        world_size=distributed.world_size(),
        flops=meter.run_flops(),
        model=model,
        device=str(meter.device),
        dtype=meter.peak.dtype if meter.peak is not None else None,
        parallelism=meter.parallelism.as_config(),
        matmul_dtypes=meter.matmul_dtypes(),
        peak_per_dtype=meter.dtype_peaks() is not None,
    )


def _run_totals(meter: MFUMeter | None) -> dict[str, float] | None:
    """The run's totals as the report divides them, once a step was read."""
    if meter is None or meter.last_window is None:
        return None
    return meter.run_totals()
