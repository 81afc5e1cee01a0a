"""``MFUOptions`` is the one list of options: the meter's and the callbacks' keywords are its fields, and
every option survives a checkpoint round trip of each framework."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import torch
from torch import nn

from mfu_callbacks import MFUMeter, MFUOptions
from mfu_callbacks._options import FUNCTION_OPTIONS, MeterKeywords, OptionKeywords
from tests.conftest import tiny_llama


def count_tokens(batch: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"]}


def call_with_keywords(model: nn.Module, batch: Any) -> Any:
    return model(**batch)


# One value per option, none of them its default.
NON_DEFAULT: dict[str, Any] = {
    "peak_tflops": 1.5,
    "dtype": "bf16",
    "warmup_steps": 5,
    "log_interval": 3,
    "prefix": "mine/",
    "token_counter": count_tokens,
    "forward": call_with_keywords,
    "report": False,
    "silence_diagnostics": ("padding_waste",),
    "summary_dir": "runs/here",
    "real_step": "only",
    "profile_steps": 2,
    "profile_start": 4,
}
OPTION_NAMES = sorted(MFUOptions.names())


def test_every_option_has_a_non_default_value_here():
    assert set(NON_DEFAULT) == set(OPTION_NAMES)
    for field in fields(MFUOptions):
        assert NON_DEFAULT[field.name] != field.default, field.name


def test_the_keyword_types_are_the_fields():
    """What an IDE shows for ``MFUCallback(**options)`` and ``MFUMeter(**options)`` is ``MFUOptions``."""
    hints = get_type_hints(MFUOptions)
    keywords = get_type_hints(OptionKeywords)
    assert set(keywords) == set(hints)
    for name, hint in keywords.items():
        if name != "silence_diagnostics":  # any iterable of ids is taken, and kept as a tuple
            assert hint == hints[name], name
    assert set(get_type_hints(MeterKeywords)) < set(keywords)


def test_the_meter_takes_its_options_by_keyword_or_whole_and_refuses_the_reporting_ones():
    model = nn.Linear(2, 2)
    by_keyword = MFUMeter(model, peak_tflops=2.0, warmup_steps=4, profile_steps=1)
    whole = MFUMeter(model, options=MFUOptions(peak_tflops=2.0, warmup_steps=4, profile_steps=1))
    for meter in (by_keyword, whole):
        assert meter.options.warmup_steps == 4 and meter.peak is not None and meter.peak.flops == 2e12
    with pytest.raises(TypeError, match="prefix"):
        MFUMeter(model, prefix="x/")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="not both"):
        MFUMeter(model, options=MFUOptions(), warmup_steps=1)


def test_to_json_holds_every_option_but_the_functions_and_from_json_reads_it_back():
    options = MFUOptions(**NON_DEFAULT)
    saved = json.loads(json.dumps(options.to_json()))
    assert set(saved) == set(OPTION_NAMES) - set(FUNCTION_OPTIONS)
    functions = {name: NON_DEFAULT[name] for name in FUNCTION_OPTIONS}
    assert MFUOptions.from_json(saved, **functions) == options
    assert MFUOptions.from_json({**saved, "from_a_newer_version": 1}, **functions) == options
    assert MFUOptions.unknown({**saved, "from_a_newer_version": 1}) == ["from_a_newer_version"]
    as_dtype = MFUOptions.from_json(MFUOptions(dtype=torch.bfloat16).to_json())
    assert as_dtype.dtype == "bfloat16"  # the torch dtype by its name, which means the same


# -- the round trip of each framework's checkpoint ---------------------------------------------------
def _keywords(options: MFUOptions) -> dict[str, Any]:
    return {field.name: getattr(options, field.name) for field in fields(options)}


@pytest.fixture(scope="module")
def hf_round_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return hf_checkpoint(str(tmp_path_factory.mktemp("hf")))


def hf_checkpoint(folder: str) -> tuple[Any, Any]:
    """The user's callback, and the one the Trainer rebuilds from its checkpoint
    (``restore_callback_states_from_checkpoint=True``), through ``trainer_state.json``."""
    from transformers import Trainer, TrainerState, TrainingArguments

    from mfu_callbacks.transformers import MFUCallback

    original = MFUCallback(**NON_DEFAULT)
    state = TrainerState(stateful_callbacks=[original])
    state.save_to_json(str(Path(folder) / "trainer_state.json"))
    args = TrainingArguments(
        output_dir=folder, report_to=[], use_cpu=True, restore_callback_states_from_checkpoint=True
    )
    trainer = Trainer(model=tiny_llama(), args=args, callbacks=[MFUCallback()])
    trainer.state = TrainerState.load_from_json(str(Path(folder) / "trainer_state.json"))
    trainer._load_callback_state()
    (rebuilt,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, MFUCallback)]
    return original, rebuilt


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_every_option_survives_the_hf_trainer_checkpoint(name, hf_round_trip):
    original, rebuilt = hf_round_trip
    if name in FUNCTION_OPTIONS:  # a function cannot be saved in JSON: the rebuilt callback says so
        assert getattr(rebuilt.options, name) is None
        assert name in original.state()["args"]["mfu_not_saved"]
    else:
        assert getattr(rebuilt.options, name) == getattr(original.options, name) == NON_DEFAULT[name]


@pytest.fixture(scope="module")
def lightning_round_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return lightning_checkpoint(str(tmp_path_factory.mktemp("lightning")))


def lightning_checkpoint(folder: str) -> tuple[Any, Any]:
    """A Lightning callback's state through a checkpoint file, and the callback rebuilt from it alone
    (the functions given again), the state loaded as Lightning loads it."""
    from mfu_callbacks.lightning import MFUCallback

    original = MFUCallback(**NON_DEFAULT)
    original.session.attach(tiny_llama())
    path = Path(folder) / "last.ckpt"
    torch.save({"callbacks": {"MFUCallback": original.state_dict()}}, path)
    saved = torch.load(path, weights_only=True)["callbacks"]["MFUCallback"]
    functions = {name: NON_DEFAULT[name] for name in FUNCTION_OPTIONS}
    rebuilt = MFUCallback(**_keywords(MFUOptions.from_json(saved["options"], **functions)))
    rebuilt.load_state_dict(saved)
    return original, rebuilt


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_every_option_survives_the_lightning_checkpoint(name, lightning_round_trip):
    original, rebuilt = lightning_round_trip
    assert getattr(rebuilt.options, name) == getattr(original.options, name) == NON_DEFAULT[name]


@pytest.fixture(scope="module")
def accelerate_round_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return accelerate_checkpoint(str(tmp_path_factory.mktemp("accelerate")))


def accelerate_checkpoint(folder: str) -> tuple[Any, Any]:
    """``accelerator.save_state`` with a tracker, and the tracker rebuilt from ``mfu_state.json`` alone
    (the functions given again) before ``accelerator.load_state``."""
    from accelerate import Accelerator

    from mfu_callbacks.accelerate import STATE_FILE, MFUTracker

    def tracked(build: Any) -> tuple[Accelerator, MFUTracker]:
        accelerator = Accelerator(cpu=True, project_dir=folder)
        model = accelerator.prepare(tiny_llama())
        return accelerator, build(accelerator, model)

    accelerator, original = tracked(lambda a, m: MFUTracker(a, m, **NON_DEFAULT))
    accelerator.save_state(str(Path(folder) / "state"))
    original.close()
    saved = json.loads((Path(folder) / "state" / STATE_FILE).read_text())
    functions = {name: NON_DEFAULT[name] for name in FUNCTION_OPTIONS}
    options = _keywords(MFUOptions.from_json(saved["options"], **functions))
    accelerator, rebuilt = tracked(lambda a, m: MFUTracker(a, m, **options))
    accelerator.load_state(str(Path(folder) / "state"))
    rebuilt.close()
    return original, rebuilt


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_every_option_survives_the_accelerate_checkpoint(name, accelerate_round_trip):
    original, rebuilt = accelerate_round_trip
    assert getattr(rebuilt.options, name) == getattr(original.options, name) == NON_DEFAULT[name]
