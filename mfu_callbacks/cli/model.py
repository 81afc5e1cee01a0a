"""A model's step planned from a local Hugging Face config.json: the config read and checked, the model
built on the meta device (nothing allocated, nothing downloaded), and the FLOPs of one step counted.

``estimate`` and ``doctor`` both start here; every problem is a ``CliError`` that names the file or the
flag and says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._input_files import InputFileError, load_json
from ._common import CliError, ModelArguments, reason

# The engine learns the batch's layout from a meta-device batch of this shape (no memory); the
# step's FLOPs then follow from its sizes alone (features_of_full_rows), at any batch size.
_TEMPLATE_SHAPE = (2, 8)
# Every layer (and expert) is built as Python objects, even on the meta device: 1,000 layers take
# seconds, ten million would exhaust the memory. Models have a few hundred layers at most.
_MAX_MODULES = {"layers": 10_000, "experts": 100_000}
_MODULE_COUNT_FIELD = re.compile(
    r"^(num|n)_(hidden_|decoder_|encoder_)?(layers?|experts?)$|^(num|n)_local_experts$"
)
ESTIMATE_IN_PYTHON = (
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


def count_step(arguments: ModelArguments, *, gradient_checkpointing: bool = False) -> tuple[Any, Any, Any]:
    """The config, its model built on the meta device, and the FLOPs of one step of the arguments' batch."""
    import torch

    from ..flops import BatchError, FlopEngine, ModelIntrospectionError
    from ..flops.features import features_of_full_rows

    config = load_config(arguments.config)
    model = model_from_config(
        config,
        arguments.config,
        lora_rank=arguments.lora_rank,
        lora_targets=arguments.lora_targets,
        gradient_checkpointing=gradient_checkpointing,
    )
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    template = {"input_ids": torch.empty(_TEMPLATE_SHAPE, dtype=torch.long, device="meta")}
    if encoder_decoder:
        template["decoder_input_ids"] = torch.empty(_TEMPLATE_SHAPE, dtype=torch.long, device="meta")
    try:
        engine = FlopEngine.from_model(model, template)
    except (BatchError, ModelIntrospectionError) as error:
        raise CliError(
            f"cannot count the FLOPs of the {config.model_type!r} model of {arguments.config}: {reason(error)}"
        ) from None
    # batch_size full rows of seq_len tokens (the decoder of an encoder-decoder as long as its encoder)
    step = engine.evaluate(
        features_of_full_rows(
            arguments.batch_size,
            arguments.seq_len,
            arguments.seq_len if encoder_decoder else None,
            engine.counting.windows,
            engine.counting.kernel_windows,
        )
    )
    return config, model, step


def load_config(path: str) -> Any:
    """The transformers config of the config.json at ``path``, its model types and sizes checked first."""
    values = _read_config(path)
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
                f"knows: upgrade transformers, or {ESTIMATE_IN_PYTHON}"
            )
    model_type = values["model_type"]
    _check_sizes(values, path)
    try:
        return AutoConfig.for_model(**values)
    except Exception as error:  # noqa: BLE001 - a config class may reject its values with any exception
        raise CliError(f"cannot build a {model_type!r} config from {path}: {reason(error)}") from None


def _read_config(path: str) -> dict[str, Any]:
    """The JSON object in the file at ``path`` (``--config``), read within the input limits."""
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
    return values


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


def model_from_config(
    config: Any,
    path: str,
    *,
    lora_rank: int = 0,
    lora_targets: str = "",
    gradient_checkpointing: bool = False,
) -> Any:
    """The language model of ``config`` (read from ``path``, named in errors) on the meta device, in
    training mode, with activation checkpointing and LoRA adapters (rank ``lora_rank`` on the
    comma-separated ``lora_targets``, all linear layers when empty) when asked."""
    import torch

    factory = _model_factory(config, path)
    try:
        with torch.device("meta"):
            model = factory.from_config(config)
    except Exception as error:  # noqa: BLE001 - the model's own code may reject a config with any exception
        raise CliError(
            f"cannot build the {config.model_type!r} model of {path} ({reason(error)}): check "
            "its sizes, or " + ESTIMATE_IN_PYTHON
        ) from None
    model.train()
    if gradient_checkpointing:
        try:
            model.gradient_checkpointing_enable()
        except ValueError as error:
            raise CliError(f"{reason(error)}: leave out --gradient-checkpointing") from None
    if lora_rank:
        model = _with_lora(model, lora_rank, lora_targets)
    return model


def _with_lora(model: Any, rank: int, targets_text: str) -> Any:
    """``model`` wrapped by peft with LoRA adapters of ``rank``, built on the meta device too."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise CliError("--lora-rank needs peft: pip install 'mfu-callbacks[transformers]'") from None
    targets = [name.strip() for name in targets_text.split(",") if name.strip()] or "all-linear"
    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
    )
    try:
        with torch.device("meta"):  # the adapters too: nothing is allocated, at any rank
            return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    except ValueError as error:
        raise CliError(
            f"cannot put LoRA on --lora-targets {targets_text or 'all-linear'} "
            f"({reason(error)}): the model's linear layers are {', '.join(linear)}"
        ) from None


def _model_factory(config: Any, path: str) -> Any:
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
            f"tokens from --seq-len; {ESTIMATE_IN_PYTHON}"
        )
    return CliError(
        f"{path} is a {name}, which transformers does not build as a {kind} language model, and estimate "
        f"builds only those: {ESTIMATE_IN_PYTHON}"
    )


def _main_input_name(config: Any) -> str | None:
    """What the config's base model takes first (``input_ids``, ``pixel_values``, ``input_features``, ...)."""
    from transformers import MODEL_MAPPING

    try:
        name = getattr(MODEL_MAPPING[type(config)], "main_input_name", None)
    except Exception:  # noqa: BLE001 - no base model, or its module fails to import: nothing to add
        return None
    return name if isinstance(name, str) else None
