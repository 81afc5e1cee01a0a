"""Compare runs by MFU and throughput, with confidence intervals, and gate CI on a drop.

    mfu-callbacks compare main/mfu_summary.json pr/mfu_summary.json
    mfu-callbacks compare runs/main runs/pr --names main,pr --max-drop 2 --json

The first run is the baseline, every other one a candidate. Each run may be a run summary
(``mfu_summary.json`` or its folder), a W&B offline run (folder or ``.wandb`` file), a Lightning
``metrics.csv`` (or its log dir) or a Trainer ``trainer_state.json`` (or its output dir).

**Figures.** Each logged window (one metrics read: the steps since the previous read) is one
sample; the first ``--warmup-windows`` (default 0) of every run are left out, on top of the
meter's own warm-up steps. A run's figure is a ratio of totals, as its end-of-run report divides
them (MFU: all model FLOPs over all GPU-seconds over the peak): a run summary written since 0.2.0
stores the totals, and with no window left out its MFU is the report's. Logs without totals (older
summaries, W&B, ``metrics.csv``, ``trainer_state.json``) weight each window by its length (step
time × steps since the previous window), and the notes say so.

**Difference and interval.** For each metric, the candidate's difference from the baseline is the
ratio of their figures, in percent, and its interval is Welch's t-interval on the log of that ratio
(the ratio estimator's variance from each run's windows, Welch–Satterthwaite degrees of freedom,
two-sided, ``--confidence`` 0.95 by default), turned back into percent: it never reaches -100%.
``padding`` and ``input wait``, fractions that are often zero, are compared in percentage points.
The t quantile is computed here: no scipy. Windows are treated as independent: slow drifts within
a run (thermals, a neighbour on the node) make the interval too narrow, and only another run shows
them.

**Verdict.** "faster" when the interval of tokens/s per GPU lies above zero, "slower" when below,
else "no difference within noise" (the gate's metric decides when a run lacks tokens/s).

**Gate.** Let the *change* be the relative difference of the gate's metric (``--metric``, default
``mfu``), turned for step time so that a negative change is always worse (a step 10% longer is a
speed 9.1% lower), with interval [low, high]. A candidate fails when ``high < -max_drop``: the whole
interval lies below ``-max_drop`` percent, so the metric dropped by more than ``max_drop`` with the
stated confidence (one-sided, ``(1 + confidence) / 2``: 97.5% by default). It passes when the
interval is narrow enough to have seen such a drop (half its width at most ``max_drop``). Otherwise
there are not enough windows to decide: fewer than ``--min-windows`` (default 5) in a run, or an
interval wider than ``max_drop`` (a noisy or short run), and no verdict is given.

Exit codes: 0 every candidate passed, 1 a candidate failed, 3 none failed but one could not be
decided (not enough windows: log more often or train longer), 2 a run cannot be read or compared.
Runs differ by more than their windows do (another node, another day): compare a rerun of the
baseline with the baseline to see how much, and set ``max_drop`` above that.

**Setups.** Runs measured on different GPUs or dtypes are refused unless ``--allow-mismatch``. When
FLOPs per token differ (another model, sequence length, LoRA), MFU and tokens/s answer different
questions: tokens/s per GPU says whether training got faster, MFU whether it uses the GPU better.
"""

from __future__ import annotations

from .figures import FLOPS_PER_TOKEN
from .intervals import Difference, Estimate, difference, t_quantile, welch_difference
from .rows import GATE_METRICS, ROWS, SPEED_METRIC
from .samples import CompareError, RunSamples, load_run
from .table import format_table
from .verdict import (
    DEFAULT_MIN_WINDOWS,
    EXIT_DROP,
    EXIT_OK,
    EXIT_UNDECIDED,
    Candidate,
    Comparison,
    Gate,
    compare_runs,
)

__all__ = [
    "DEFAULT_MIN_WINDOWS",
    "EXIT_DROP",
    "EXIT_OK",
    "EXIT_UNDECIDED",
    "FLOPS_PER_TOKEN",
    "GATE_METRICS",
    "ROWS",
    "SPEED_METRIC",
    "Candidate",
    "CompareError",
    "Comparison",
    "Difference",
    "Estimate",
    "Gate",
    "RunSamples",
    "compare_runs",
    "difference",
    "format_table",
    "load_run",
    "t_quantile",
    "welch_difference",
]
