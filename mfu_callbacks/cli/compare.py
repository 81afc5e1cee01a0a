"""``mfu-callbacks compare``: runs compared by MFU and throughput with confidence intervals, and the CI
gate's exit code. The method is :mod:`mfu_callbacks.runs.compare`'s, whose docstring is this command's help."""

from __future__ import annotations

import argparse
import json
import sys

from .. import metrics as m
from ..runs import compare
from ..runs.labels import default_labels
from ._common import EXIT_USAGE

SUMMARY = "compare runs' MFU and throughput with confidence intervals; gate CI on a drop"


def add_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compare`` command to the ``mfu-callbacks`` subcommands; its handler is :func:`run`."""
    parser = subcommands.add_parser(
        "compare",
        help=SUMMARY,
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 no drop beyond --max-drop, 1 a candidate dropped, 2 a run could not be read or "
        "compared, 3 not enough windows to decide (fewer than --min-windows, or an interval wider than "
        "--max-drop).\nexamples:\n  mfu-callbacks compare runs/main runs/pr\n"
        "  mfu-callbacks compare main/mfu_summary.json pr/mfu_summary.json --max-drop 3 --json",
    )
    parser.add_argument("baseline", help="the run to compare against")
    parser.add_argument("candidates", nargs="+", metavar="candidate", help="runs compared with the baseline")
    parser.add_argument(
        "--metric", default=m.MFU, choices=compare.GATE_METRICS, help="what the gate watches (default: mfu)"
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=2.0,
        metavar="PCT",
        help="fail when the metric dropped by more than PCT percent with confidence (default: 2)",
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="two-sided interval level (default: 0.95)"
    )
    parser.add_argument(
        "--warmup-windows",
        type=int,
        default=0,
        metavar="N",
        help="windows left out at the start of every run, on top of the meter's warm-up steps (default: 0, "
        "which gives a run summary the figures of its own report)",
    )
    parser.add_argument(
        "--min-windows",
        type=int,
        default=compare.DEFAULT_MIN_WINDOWS,
        metavar="N",
        help="windows each run needs for a gate verdict; fewer: exit code 3 "
        f"(default: {compare.DEFAULT_MIN_WINDOWS})",
    )
    parser.add_argument(
        "--names", help="comma-separated labels, baseline first (default: file or folder names)"
    )
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="compare runs on different GPUs or dtypes"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``compare``: print the table (or JSON) and return the exit code (0, 1, 3, or 2 after one error line)."""
    try:
        comparison = _compare(args)
    except compare.CompareError as error:
        print(f"mfu-callbacks: error: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"exit_code": EXIT_USAGE, "error": str(error)}))
        return EXIT_USAGE
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2, allow_nan=False, default=str))
    else:
        print(compare.format_table(comparison))
    return comparison.exit_code


def _compare(args: argparse.Namespace) -> compare.Comparison:
    paths = [args.baseline, *args.candidates]
    if args.warmup_windows < 0:
        raise compare.CompareError(f"--warmup-windows must be >= 0, got {args.warmup_windows}")
    labels = default_labels(paths)
    if args.names:
        labels = [name.strip() for name in args.names.split(",")]
        if len(labels) != len(paths) or len(set(labels)) != len(labels) or not all(labels):
            raise compare.CompareError(
                f"--names needs {len(paths)} distinct names, baseline first; got {args.names!r}"
            )
    runs = [compare.load_run(path, label, args.warmup_windows) for path, label in zip(paths, labels)]
    return compare.compare_runs(
        runs[0],
        runs[1:],
        metric=args.metric,
        max_drop=args.max_drop,
        confidence=args.confidence,
        allow_mismatch=args.allow_mismatch,
        min_windows=args.min_windows,
    )
