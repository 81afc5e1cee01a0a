"""``mfu-callbacks plot``: the MFU curve above the loss curve of a run, or of several runs overlaid."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import CliError

SUMMARY = "the MFU curve above the loss curve, from a finished or running run"
_MAX_DPI = 1200  # 9600 x 6600 pixels for the 8 x 5.5 inch figure


def add_parser(commands: Any) -> None:
    plot = commands.add_parser(
        "plot",
        help=SUMMARY,
        description="Reads a W&B offline run (folder or .wandb file), a Lightning metrics.csv or a Trainer "
        "trainer_state.json.",
        epilog="examples:\n  mfu-callbacks plot wandb/offline-run-20261124_120000-abc123 -o mfu.png\n"
        "  mfu-callbacks plot lightning_logs/version_0/metrics.csv -o mfu.png\n"
        "  mfu-callbacks plot out/checkpoint-500/trainer_state.json -o mfu.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument(
        "run",
        nargs="+",
        help="W&B run folder or .wandb file, metrics.csv, or trainer_state.json; several runs are overlaid",
    )
    plot.add_argument("-o", "--output", default="mfu.png", help="image to write (default: mfu.png)")
    plot.add_argument(
        "--dpi", type=int, default=120, help=f"resolution of a raster image, 1 to {_MAX_DPI} (default: 120)"
    )
    plot.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    """Check the image and the resolution before reading any run, then draw the runs."""
    from ..runs.logs import RunLogError
    from ..runs.plot import PlotError, plot_runs, pyplot

    if not 1 <= args.dpi <= _MAX_DPI:
        raise CliError(
            f"--dpi must be between 1 and {_MAX_DPI} (got {args.dpi}): 120 is the default, 300 suits print"
        )
    try:
        pyplot()
        from matplotlib.backend_bases import FigureCanvasBase

        output = _image_path(args.output, FigureCanvasBase.get_supported_filetypes())
        print(plot_runs(args.run, output, args.dpi))
    except (RunLogError, PlotError) as error:
        raise CliError(str(error)) from None


def _image_path(output: str, supported: dict[str, str]) -> Path:
    """The file ``-o`` names, checked before any reading: a writable folder and an image type matplotlib writes."""
    path = Path(output)
    if path.is_dir():
        raise CliError(f"-o {output} is a folder: name an image file, e.g. {path / 'mfu.png'}")
    if not path.parent.is_dir():
        raise CliError(
            f"cannot write {output}: the folder {path.parent} does not exist; create it or choose another -o"
        )
    if not path.suffix:  # matplotlib would append .png; say so in what is printed
        return path.with_name(path.name + ".png")
    if path.suffix[1:].lower() not in supported:
        types = ", ".join("." + name for name in sorted(supported))
        raise CliError(f"-o {output}: cannot write {path.suffix} images; end the name with one of {types}")
    return path
