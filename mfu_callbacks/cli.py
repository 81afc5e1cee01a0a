"""The ``mfu-callbacks`` command line: plan a run's FLOPs and time its step before starting it, plot and compare runs after.

examples:
  mfu-callbacks estimate --config config.json --seq-len 4096 --batch-size 8 --gpu h100
  mfu-callbacks estimate --config config.json --seq-len 2048 --batch-size 4 --lora-rank 16 --lora-targets q_proj,v_proj
  mfu-callbacks doctor --config config.json --seq-len 2048 --batch-size 4
  mfu-callbacks plot wandb/offline-run-20261124_120000-abc123 -o mfu.png
  mfu-callbacks compare runs/main runs/pr --max-drop 2

With --json, every command prints its result, or its error ({"exit_code": 2, "error": ...}), as JSON
on stdout. mfu-callbacks COMMAND --help describes each command.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from ._input_files import InputFileError, load_json
from ._version import __version__

EXIT_USAGE = 2
_TRACEBACK_ENV = "MFU_CLI_TRACEBACK"
# Commands whose modules import torch: their arguments are added only when they run, so that
# `mfu-callbacks --help` and `--version` start in a fraction of a second. The listing shows these
# summaries (tests check they match the ones the modules register).
_LAZY_COMMANDS = {
    "compare": "compare runs' MFU and throughput with confidence intervals; gate CI on a drop",
    "doctor": "time each matmul shape, attention and the optimizer of a config's step on this device",
}
# reStructuredText in docstrings shown as help: ``code``, **bold**, :func:`name`.
_RST_MARKUP = re.compile(r"``(.+?)``|\*\*(.+?)\*\*|:\w+:`(.+?)`", re.DOTALL)
_MFU_LEVELS = (1.0, 0.5, 0.4)
# The engine learns the batch's layout from a meta-device batch of this shape (no memory); the
# step's FLOPs then follow from its sizes alone (features_of_full_rows), at any batch size.
_TEMPLATE_SHAPE = (2, 8)
_MAX_DPI = 1200  # 9600 x 6600 pixels for the 8 x 5.5 inch figure
# A count on the command line (tokens in a row, rows, a rank) beyond this is a typo: 2**31, past any
# context length; products of such counts still fit the int64 sizes torch's meta tensors take.
_MAX_COUNT = 2**31
# Every layer (and expert) is built as Python objects, even on the meta device: 1,000 layers take
# seconds, ten million would exhaust the memory. Models have a few hundred layers at most.
_MAX_MODULES = {"layers": 10_000, "experts": 100_000}
_MODULE_COUNT_FIELD = re.compile(
    r"^(num|n)_(hidden_|decoder_|encoder_)?(layers?|experts?)$|^(num|n)_local_experts$"
)
_REASON_CHARS = 300  # of a library's error message, quoted in ours
_ESTIMATE_IN_PYTHON = (
    "build the model in Python and call mfu_callbacks.estimate_step_flops(model, batch) "
    "on one batch of its inputs"
)

# Config fields that hold a size or a count: never negative ("num_*", "n_*", "*_size", "head_dim", "d_model", ...).
_SIZE_FIELD = re.compile(
    r"^(num|n)_|(^|_)(size|dim|heads|layers|experts|embd|positions|inner|ff|kv|model|rank)$"
)
# Sizes no model can be built with at zero, by the names model families give them.
_NONZERO_FIELDS = frozenset(
    {
        "hidden_size",
        "n_embd",
        "d_model",
        "vocab_size",
        "head_dim",
        "d_kv",
        "num_attention_heads",
        "num_heads",
        "n_head",
        "n_heads",
        "num_key_value_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
    }
)


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line, as every other error is (not usage, then the error)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see: {self.prog} --help)")


def _reason(error: BaseException) -> str:
    """A library's error message on one line, cut to a readable length."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _check_arguments(args: argparse.Namespace) -> None:
    for flag, value, meaning in (
        ("--seq-len", args.seq_len, "tokens in one row"),
        ("--batch-size", args.batch_size, "rows in one optimizer step of one GPU"),
    ):
        if value <= 0:
            raise CliError(f"{flag} must be positive (got {value}): the {meaning}")
        if value > _MAX_COUNT:
            raise CliError(f"{flag} must be at most {_MAX_COUNT:,} (got {value:,}): the {meaning}")
    if args.lora_rank < 0:
        raise CliError(
            f"--lora-rank must be positive (got {args.lora_rank}): the LoRA rank, e.g. 16; leave it out "
            "for full fine-tuning"
        )
    if args.lora_rank > _MAX_COUNT:
        raise CliError(
            f"--lora-rank must be at most {_MAX_COUNT:,} (got {args.lora_rank:,}): the LoRA rank, e.g. 16"
        )
    if args.lora_targets and not args.lora_rank:
        raise CliError("--lora-targets needs --lora-rank (the LoRA rank, e.g. --lora-rank 16)")


def _check_sizes(values: dict, path: str, prefix: str = "") -> None:
    """Negative sizes and zero widths or heads, named by their field, before the model's own code trips on them."""
    for key, value in values.items():
        if isinstance(value, dict):
            _check_sizes(value, path, f"{prefix}{key}.")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not _SIZE_FIELD.search(key):
            continue
        if value < 0 or (value == 0 and key in _NONZERO_FIELDS):
            least = "positive" if key in _NONZERO_FIELDS else "zero or more"
            raise CliError(
                f"{path}: {prefix}{key} is {value}, but it is a size and must be {least}: "
                "correct it in the config"
            )
        if _MODULE_COUNT_FIELD.search(key):
            limit = _MAX_MODULES["experts" if "expert" in key else "layers"]
            if value > limit:
                raise CliError(
                    f"{path}: {prefix}{key} is {value:,}, more than {limit:,}: every one is built (as Python "
                    "objects, even on the meta device), and no model has so many; correct it in the config"
                )


def _load_config(path: str) -> Any:
    file = Path(path)
    if file.is_dir():
        raise CliError(f"--config {path} is a folder: pass the config.json in it")
    if not file.is_file():
        raise CliError(f"config file not found: {path}")
    try:
        values = load_json(file, "expected a Hugging Face config.json (JSON text)", allow_nan=True)
    except InputFileError as error:
        raise CliError(str(error)) from None
    if not isinstance(values, dict):
        raise CliError(
            f"{path} holds a JSON {type(values).__name__}, not an object: expected a Hugging Face "
            'config.json ({"model_type": ..., "hidden_size": ..., ...})'
        )
    try:
        import transformers
        from transformers import CONFIG_MAPPING, AutoConfig
    except ImportError:
        raise CliError("estimate needs transformers: pip install 'mfu-callbacks[transformers]'") from None
    if not values.get("model_type"):
        raise CliError(f"{path} has no 'model_type': is it a Hugging Face config.json?")
    # the config's own model_type, then those of sub-configs (text_config, vision_config, ...)
    types = [("model_type", values["model_type"])] + [
        (f"{key}.model_type", value["model_type"])
        for key, value in values.items()
        if isinstance(value, dict) and "model_type" in value
    ]
    for field, model_type in types:
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise CliError(
                f"{path}: {field} {model_type!r} is not one that transformers {transformers.__version__} "
                f"knows: upgrade transformers, or {_ESTIMATE_IN_PYTHON}"
            )
    model_type = values["model_type"]
    _check_sizes(values, path)
    try:
        return AutoConfig.for_model(**values)
    except Exception as error:  # noqa: BLE001 - a config class may reject its values with any exception
        raise CliError(f"cannot build a {model_type!r} config from {path}: {_reason(error)}") from None


def _model_factory(config: Any, path: str):
    """The Auto class that builds this config as a language model: seq2seq for an encoder-decoder, else causal."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
    )

    factory: type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]
    if getattr(config, "is_encoder_decoder", False):
        kind, factory, mapping = "seq2seq", AutoModelForSeq2SeqLM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    else:
        kind, factory, mapping = "causal", AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING
    if type(config) not in mapping:
        raise _not_a_language_model(config, path, kind)
    return factory


def _not_a_language_model(config: Any, path: str, kind: str) -> CliError:
    """Why estimate cannot plan this config, and what can: it plans token rows from --seq-len alone."""
    name = f"{type(config).__name__} ({config.model_type!r})"
    if (
        getattr(config, "vision_config", None) is not None
        and getattr(config, "text_config", None) is not None
    ):
        # The Python engine traces its model on the meta device, where the check that image tokens
        # match image features cannot run: no remedy counts the image work yet.
        return CliError(
            f"{path} is a {name}, a vision-language model: estimate plans rows of text tokens and cannot "
            "count the work on its images; to plan its language model alone, save the config's "
            "'text_config' as a config.json of its own and pass that"
        )
    main_input = _main_input_name(config)
    if main_input not in (None, "input_ids"):
        return CliError(
            f"{path} is a {name}, whose model takes {main_input}, not token ids: estimate plans rows of text "
            f"tokens from --seq-len; {_ESTIMATE_IN_PYTHON}"
        )
    return CliError(
        f"{path} is a {name}, which transformers does not build as a {kind} language model, and estimate "
        f"builds only those: {_ESTIMATE_IN_PYTHON}"
    )


def _main_input_name(config: Any) -> str | None:
    """What the config's base model takes first (``input_ids``, ``pixel_values``, ``input_features``, ...)."""
    from transformers import MODEL_MAPPING

    try:
        name = getattr(MODEL_MAPPING[type(config)], "main_input_name", None)
    except Exception:  # noqa: BLE001 - no base model, or its module fails to import: nothing to add
        return None
    return name if isinstance(name, str) else None


def _build_model(config: Any, args: argparse.Namespace):
    import torch

    factory = _model_factory(config, args.config)
    try:
        with torch.device("meta"):
            model = factory.from_config(config)
    except Exception as error:  # noqa: BLE001 - the model's own code may reject a config with any exception
        raise CliError(
            f"cannot build the {config.model_type!r} model of {args.config} ({_reason(error)}): check "
            "its sizes, or " + _ESTIMATE_IN_PYTHON
        ) from None
    model.train()
    if args.gradient_checkpointing:
        try:
            model.gradient_checkpointing_enable()
        except ValueError as error:
            raise CliError(f"{_reason(error)}: leave out --gradient-checkpointing") from None
    if args.lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise CliError("--lora-rank needs peft: pip install 'mfu-callbacks[transformers]'") from None
        targets = [name.strip() for name in args.lora_targets.split(",") if name.strip()] or "all-linear"
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear)
            }
        )
        try:
            with torch.device("meta"):  # the adapters too: nothing is allocated, at any rank
                model = get_peft_model(
                    model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets)
                )
        except ValueError as error:
            raise CliError(
                f"cannot put LoRA on --lora-targets {args.lora_targets or 'all-linear'} "
                f"({_reason(error)}): the model's linear layers are {', '.join(linear)}"
            ) from None
    return model


def _count(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The config, its model built on the meta device, and the FLOPs of one step of the arguments' batch."""
    import torch

    from .flops import BatchError, FlopEngine, ModelIntrospectionError
    from .flops.features import features_of_full_rows

    config = _load_config(args.config)
    model = _build_model(config, args)
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    template = {"input_ids": torch.empty(_TEMPLATE_SHAPE, dtype=torch.long, device="meta")}
    if encoder_decoder:
        template["decoder_input_ids"] = torch.empty(_TEMPLATE_SHAPE, dtype=torch.long, device="meta")
    try:
        engine = FlopEngine.from_model(model, template)
    except (BatchError, ModelIntrospectionError) as error:
        raise CliError(
            f"cannot count the FLOPs of the {config.model_type!r} model of {args.config}: {_reason(error)}"
        ) from None
    # batch_size full rows of seq_len tokens (the decoder of an encoder-decoder as long as its encoder)
    step = engine.evaluate(
        features_of_full_rows(
            args.batch_size,
            args.seq_len,
            args.seq_len if encoder_decoder else None,
            engine.counting.windows,
            engine.counting.kernel_windows,
        )
    )
    return config, model, step


def _estimate(args: argparse.Namespace) -> dict[str, Any]:
    from .hardware import lookup_gpu, short_gpu_names

    _check_arguments(args)
    gpu = None
    if args.gpu:
        gpu = lookup_gpu(args.gpu)
        if gpu is None:
            names = short_gpu_names()
            close = difflib.get_close_matches(args.gpu.lower(), names, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise CliError(
                f"unknown GPU {args.gpu!r}: {hint}known: {', '.join(names)} (a device name such as "
                "'NVIDIA H100 80GB HBM3' works too); for a chip the table lacks, leave --gpu out"
            )
    config, _, step = _count(args)
    result: dict[str, Any] = {
        "model_type": config.model_type,
        "tokens_per_step": step.tokens,
        "model_flops_per_step": step.model_flops,
        "hardware_flops_per_step": step.hardware_flops,
        "model_flops_per_token": step.model_flops / step.tokens,
        "breakdown": step.breakdown,
    }
    if gpu is not None:
        tflops = gpu.dense_tflops(args.dtype)
        if tflops is None:
            raise CliError(f"{gpu.name} has no {args.dtype} peak in the table: choose another --dtype")
        peak = tflops * 1e12
        result["gpu"] = gpu.name
        result["peak_tflops"] = tflops
        result["at_mfu"] = {
            f"{level:.0%}": {
                "step_seconds": step.model_flops / (peak * level),
                "tokens_per_sec": step.tokens * peak * level / step.model_flops,
            }
            for level in _MFU_LEVELS
        }
    return result


def _print_estimate(result: dict[str, Any]) -> None:
    print(f"{result['model_type']}: {result['tokens_per_step']:,} tokens per step")
    print(f"  model FLOPs per step     {result['model_flops_per_step']:.4g}")
    print(f"  hardware FLOPs per step  {result['hardware_flops_per_step']:.4g}")
    print(f"  model FLOPs per token    {result['model_flops_per_token']:.4g}")
    total = result["model_flops_per_step"] or 1
    print("  breakdown:")
    for name, flops in sorted(result["breakdown"].items(), key=lambda item: -item[1]):
        print(f"    {name:<24} {flops:>12.4g}  {flops / total:>6.1%}")
    if "gpu" in result:
        print(f"  on {result['gpu']} ({result['peak_tflops']:.1f} TFLOP/s dense peak):")
        for level, numbers in result["at_mfu"].items():
            print(
                f"    at {level:>4} MFU: {numbers['step_seconds'] * 1e3:10.1f} ms per step, "
                f"{numbers['tokens_per_sec']:12,.0f} tokens/s per GPU"
            )


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


def _plot(args: argparse.Namespace) -> None:
    from . import compare
    from ._runlog import RunLogError, read_curves

    if not 1 <= args.dpi <= _MAX_DPI:
        raise CliError(
            f"--dpi must be between 1 and {_MAX_DPI} (got {args.dpi}): 120 is the default, 300 suits print"
        )
    try:
        import matplotlib
    except ImportError:
        raise CliError("plot needs matplotlib: pip install 'mfu-callbacks[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    output = _image_path(args.output, FigureCanvasBase.get_supported_filetypes())
    if len(args.run) > 1:
        try:
            return compare.plot_runs(args.run, str(output), args.dpi)
        except (RunLogError, compare.CompareError) as error:
            raise CliError(str(error)) from None
    try:
        curves = read_curves(args.run[0])
    except RunLogError as error:
        raise CliError(str(error)) from None

    figure, (mfu_axis, loss_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5), height_ratios=(1, 1))
    steps, values = zip(*curves.mfu)
    mfu_axis.plot(steps, [100 * value for value in values], color="tab:green", marker=".")
    mfu_axis.set_ylabel("MFU (%)")
    mfu_axis.set_ylim(bottom=0)
    mfu_axis.grid(alpha=0.3)
    mfu_axis.set_title(f"MFU and loss: {Path(curves.source).name}", fontsize=10)
    if curves.loss:
        steps, values = zip(*curves.loss)
        loss_axis.plot(steps, values, color="tab:blue", marker=".")
    loss_axis.set_ylabel("loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(output, dpi=args.dpi)
    except (OSError, ValueError, RuntimeError) as error:
        raise CliError(f"cannot write {output}: {_reason(error)}") from None
    finally:
        plt.close(figure)
    print(
        f"wrote {output}: {len(curves.mfu)} MFU points, {len(curves.loss)} loss points from {curves.source}"
    )


class _DeprecatedSpelling(argparse.Action):
    """Stores the value under the option's one spelling; an old spelling also prints a deprecation note."""

    def __init__(self, *args: Any, old: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old = old

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string in self.old:
            print(
                f"mfu-callbacks: warning: {option_string} is deprecated and will be removed; use "
                f"{self.option_strings[0]}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every command that plans a model's step from its config (estimate, doctor)."""
    parser.add_argument("--config", required=True, help="a Hugging Face config.json (read locally)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens in one row (sequence), e.g. 2048")
    parser.add_argument(
        "--batch-size",
        type=int,
        required=True,
        help="rows in one optimizer step of one GPU (micro-batch x gradient accumulation)",
    )
    parser.add_argument(
        "--lora-rank",
        "--lora-r",
        dest="lora_rank",
        type=int,
        default=0,
        action=_DeprecatedSpelling,
        old=("--lora-r",),
        help="LoRA rank, e.g. 16 (default 0: full fine-tuning); --lora-r is a deprecated spelling",
    )
    parser.add_argument(
        "--lora-targets",
        default="",
        help="comma-separated names of the linear layers that get adapters (default: all linear layers)",
    )
    parser.add_argument("--json", action="store_true", help="print the result, or the error, as JSON")


def _plain(text: str | None) -> str | None:
    """Help text without reStructuredText markup (docstrings double as help)."""
    if not text:
        return text
    return _RST_MARKUP.sub(lambda match: next(group for group in match.groups() if group is not None), text)


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Strip the markup from a parser's texts and its subcommands', recursively."""
    parser.description, parser.epilog = _plain(parser.description), _plain(parser.epilog)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = _plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = _plain(choice.help)
            for sub in action.choices.values():
                _plain_help(sub)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; the arguments of a lazily added command only when it is ``command``."""
    parser = _Parser(
        prog="mfu-callbacks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    estimate = commands.add_parser(
        "estimate",
        help="FLOPs per step and per token of a Hugging Face config, and what a GPU would need",
        description="Builds the model on the meta device from a local config.json (nothing is downloaded).",
        epilog="example: mfu-callbacks estimate --config config.json --seq-len 4096 --batch-size 8 --gpu h100",
    )
    add_model_arguments(estimate)
    estimate.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="count activation-checkpoint recompute in the hardware FLOPs",
    )
    estimate.add_argument(
        "--gpu", help="e.g. h100, h200, a100, l40s, mi300x: adds step times at 100%%, 50%%, 40%% MFU"
    )
    estimate.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp16", "fp8", "tf32", "fp32"),
        help="the precision of the matmuls, for the GPU's peak (default: bf16)",
    )
    estimate.set_defaults(handler=_run_estimate)
    plot = commands.add_parser(
        "plot",
        help="the MFU curve above the loss curve, from a finished or running run",
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
    plot.set_defaults(handler=_plot)
    for name, summary in _LAZY_COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=summary, add_help=False)
        elif name == "compare":
            from . import compare

            compare.add_parser(commands)
        else:
            from .doctor import cli as doctor_cli

            doctor_cli.add_parser(commands)
    _plain_help(parser)
    return parser


def _run_estimate(args: argparse.Namespace) -> None:
    result = _estimate(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_estimate(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_json = "--json" in argv  # before parsing: a bad command line is answered in JSON too
    try:
        args = _parser(_command_of(argv)).parse_args(argv)
        wants_json = bool(getattr(args, "json", False))
        status = args.handler(args)
    except CliError as error:
        return _fail(str(error), wants_json)
    except (RecursionError, MemoryError, OverflowError) as error:  # an input past what was checked
        return _fail(f"the input is too large or too deeply nested to process ({_reason(error)})", wants_json)
    except Exception as error:  # noqa: BLE001 - a CI gate reads exit 1 as "dropped": never that for a bug
        if os.environ.get(_TRACEBACK_ENV):
            raise
        where = traceback.extract_tb(error.__traceback__)[-1]
        return _fail(
            f"internal error, {type(error).__name__}: {_reason(error)} (at {Path(where.filename).name}:"
            f"{where.lineno}; {_TRACEBACK_ENV}=1 prints the traceback for a bug report)",
            wants_json,
        )
    return status if isinstance(status, int) else 0


def _fail(message: str, wants_json: bool) -> int:
    """The error as one line on stderr (and as a JSON object on stdout with --json); exit code 2."""
    message = " ".join(message.split())
    print(f"mfu-callbacks: error: {message}", file=sys.stderr)
    if wants_json:
        print(json.dumps({"exit_code": EXIT_USAGE, "error": message}))
    return EXIT_USAGE


if __name__ == "__main__":  # python -m mfu_callbacks.cli: the package's classes, not this copy's
    from mfu_callbacks.cli import main as package_main

    sys.exit(package_main())
