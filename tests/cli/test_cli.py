"""The ``mfu-callbacks`` command line: estimate and plot, their error paths (exit code 2, one line), and
what every command shares: fast help, plain help text, one spelling per flag, JSON errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
)

import mfu_callbacks
from mfu_callbacks import estimate_step_flops
from mfu_callbacks.cli import _LAZY_COMMANDS, _parser, main
from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.hardware import lookup_gpu, short_gpu_names
from mfu_callbacks.testing import reference_step_flops

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def config_file(tmp_path):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    return path, config


@pytest.fixture
def t5_config_file(tmp_path):
    config = T5Config(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=128
    )
    path = tmp_path / "t5_config.json"
    path.write_text(config.to_json_string())
    return path, config


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture
def llava_config_file(tmp_path, config_file):
    """A Llava config with a tiny Llama text model and a tiny CLIP vision tower."""
    vision = CLIPVisionConfig(**TINY_VISION, image_size=32, patch_size=8)
    config = LlavaConfig(text_config=config_file[1], vision_config=vision, image_token_index=255)
    path = tmp_path / "llava.json"
    path.write_text(config.to_json_string())
    return path, config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_estimate_matches_the_engine_on_the_real_model_and_a_gpu_peak(capsys, config_file):
    path, config = config_file
    code, out, _ = run_cli(
        capsys,
        "estimate",
        "--config",
        str(path),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--gpu",
        "h100",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    torch.manual_seed(0)
    real = LlamaForCausalLM(config)
    ids = torch.zeros(2, 32, dtype=torch.long)
    expected = estimate_step_flops(real, {"input_ids": ids, "labels": ids})
    assert result["model_flops_per_step"] == expected.model_flops
    assert result["tokens_per_step"] == 64
    assert sum(result["breakdown"].values()) == result["model_flops_per_step"]
    assert result["peak_tflops"] == pytest.approx(989.4)
    assert result["at_mfu"]["40%"]["step_seconds"] == pytest.approx(expected.model_flops / (0.4 * 989.4e12))


def test_estimate_with_lora_and_checkpointing_counts_less_model_work_and_more_hardware_work(
    capsys, config_file
):
    path, _ = config_file
    base = ["estimate", "--config", str(path), "--seq-len", "32", "--batch-size", "2", "--json"]
    full = json.loads(run_cli(capsys, *base)[1])
    lora = json.loads(
        run_cli(
            capsys, *base, "--lora-rank", "8", "--lora-targets", "q_proj,v_proj", "--gradient-checkpointing"
        )[1]
    )
    assert (
        lora["model_flops_per_step"] < full["model_flops_per_step"]
    )  # no weight gradients of the frozen base
    assert lora["hardware_flops_per_step"] > lora["model_flops_per_step"]  # the recompute
    assert lora["breakdown"]["adapters"] > 0


def test_estimate_prints_a_table_a_person_can_read(capsys, config_file):
    path, _ = config_file
    code, out, _ = run_cli(
        capsys, "estimate", "--config", str(path), "--seq-len", "16", "--batch-size", "1", "--gpu", "a100"
    )
    assert code == 0
    assert "model FLOPs per token" in out and "at  40% MFU" in out and "NVIDIA A100" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["estimate", "--config", "missing.json", "--seq-len", "8", "--batch-size", "1"],
            "config file not found",
        ),
        (["estimate", "--config", "{bad}", "--seq-len", "8", "--batch-size", "1"], "cannot read"),
        (["estimate", "--config", "{no_type}", "--seq-len", "8", "--batch-size", "1"], "no 'model_type'"),
        (
            ["estimate", "--config", "{good}", "--seq-len", "8", "--batch-size", "1", "--gpu", "h1000"],
            "known: ",
        ),
        (["estimate", "--config", "{good}", "--seq-len", "0", "--batch-size", "1"], "must be positive"),
        (["plot", "missing-run", "-o", "x.png"], "no such file or folder"),
        (["plot", "{no_mfu_csv}", "-o", "x.png"], "no MFU in"),
        (["plot", "{bad}", "-o", "x.png"], "cannot read"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, tmp_path, monkeypatch, config_file, argv, message):
    monkeypatch.chdir(tmp_path)
    files = {
        "{bad}": tmp_path / "bad.json",
        "{no_type}": tmp_path / "no_type.json",
        "{good}": config_file[0],
        "{no_mfu_csv}": tmp_path / "metrics.csv",
    }
    files["{bad}"].write_text("{not json")
    files["{no_type}"].write_text(json.dumps({"hidden_size": 8}))
    files["{no_mfu_csv}"].write_text("step,train/loss\n1,2.0\n2,1.5\n")
    argv = [str(files.get(item, item)) for item in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_help_shows_examples(capsys):
    for command in ("estimate", "plot"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "mfu-callbacks " + command in capsys.readouterr().out


def check_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_from_a_lightning_csv_and_a_trainer_state(capsys, tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss,train/mfu\n0,1,3.0,\n0,2,2.5,0.41\n0,3,2.0,\n0,4,1.8,0.43\n")
    code, out, _ = run_cli(capsys, "plot", str(csv_path), "-o", str(tmp_path / "a.png"))
    assert code == 0 and "2 MFU points, 4 loss points" in out
    check_png(tmp_path / "a.png")
    state = {
        "log_history": [
            {"loss": 2.0, "mfu": 0.3, "step": 10},
            {"loss": 1.5, "mfu": 0.32, "step": 20},
            {"train_runtime": 5.0, "step": 20},
        ]
    }
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    code, out, _ = run_cli(
        capsys, "plot", str(tmp_path / "trainer_state.json"), "-o", str(tmp_path / "b.png")
    )
    assert code == 0 and "2 MFU points, 2 loss points" in out
    check_png(tmp_path / "b.png")


@pytest.mark.slow  # a W&B offline run, read back by wandb's own reader
def test_plot_from_a_wandb_offline_run(capsys, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="plot", dir=str(tmp_path))
    for step in range(1, 6):
        run.log({"train/loss": 3.0 / step, "train/mfu": 0.4 + 0.01 * step, "train/global_step": step})
    run.finish()
    wandb.teardown()
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    code, out, _ = run_cli(capsys, "plot", str(run_folder), "-o", str(tmp_path / "w.png"))
    assert code == 0 and "5 MFU points, 5 loss points" in out
    check_png(tmp_path / "w.png")


# -- a step planned from its sizes -----------------------------------------------------------------
def full_rows(rows: int, length: int, decoder_length: int | None, *, mask: bool) -> dict[str, torch.Tensor]:
    """A real batch of unpadded rows, as a collator gives it (with or without an all-ones mask)."""
    ids = torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if mask:
        batch["attention_mask"] = torch.ones_like(ids)
    if decoder_length is not None:
        decoder_ids = torch.randint(
            3, 100, (rows, decoder_length), generator=torch.Generator().manual_seed(1)
        )
        batch["decoder_input_ids"] = decoder_ids
        batch["labels"] = decoder_ids.clone()
        if mask:
            batch["decoder_attention_mask"] = torch.ones_like(decoder_ids)
    return batch


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "all-ones-mask"])
@pytest.mark.parametrize("architecture", ["decoder", "encoder-decoder"])
def test_features_of_full_rows_are_what_the_engine_counts_in_a_real_batch(
    config_file, t5_config_file, architecture, mask
):
    from mfu_callbacks.flops.features import features_of_full_rows

    torch.manual_seed(0)
    if architecture == "decoder":
        model, decoder_length = LlamaForCausalLM(config_file[1]), None
    else:
        model, decoder_length = T5ForConditionalGeneration(t5_config_file[1]), 5
    batch = full_rows(3, 7, decoder_length, mask=mask)
    engine = FlopEngine.from_model(model, batch)
    assert features_of_full_rows(3, 7, decoder_length) == engine.count(batch).tolist()
    assert engine.evaluate(features_of_full_rows(3, 7, decoder_length)) == engine.estimate(batch)


@pytest.mark.slow  # a T5 traced twice; the decoder-only estimate above stays in the unit tier
def test_estimate_of_an_encoder_decoder_matches_the_engine_on_the_real_model(capsys, t5_config_file):
    path, config = t5_config_file
    code, out, err = run_cli(
        capsys, "estimate", "--config", str(path), "--seq-len", "12", "--batch-size", "3", "--json"
    )
    assert code == 0, err
    torch.manual_seed(0)
    ids = torch.zeros(3, 12, dtype=torch.long)
    expected = estimate_step_flops(
        T5ForConditionalGeneration(config), {"input_ids": ids, "decoder_input_ids": ids}
    )
    result = json.loads(out)
    assert result["model_flops_per_step"] == expected.model_flops
    assert result["tokens_per_step"] == expected.tokens == 2 * 3 * 12  # encoder and decoder tokens


@pytest.mark.parametrize("seq_len", [6, 11])
def test_the_language_model_of_a_vision_language_config_is_planned_from_its_text_config(
    capsys, tmp_path, llava_config_file, seq_len
):
    """What the vision-language error says to do works: the text_config alone is a config estimate plans."""
    path, config = llava_config_file
    text = tmp_path / "text_config.json"
    text.write_text(json.dumps(json.loads(path.read_text())["text_config"]))
    code, out, err = run_cli(
        capsys, "estimate", "--config", str(text), "--seq-len", str(seq_len), "--batch-size", "2", "--json"
    )
    assert code == 0, err
    ids = torch.zeros(2, seq_len, dtype=torch.long)
    truth = reference_step_flops(LlamaForCausalLM(config.text_config), {"input_ids": ids}, eager_copy=True)
    result = json.loads(out)
    assert result["model_flops_per_step"] == result["hardware_flops_per_step"] == truth


def test_estimate_plans_a_huge_step_from_its_sizes_without_allocating_it(capsys, config_file):
    """4096 rows of 1M tokens: a token batch would take 32 GiB; the plan takes none and no time."""
    path, config = config_file
    rows, length = 4096, 1_048_576
    start = time.perf_counter()
    code, out, err = run_cli(
        capsys,
        "estimate",
        "--config",
        str(path),
        "--seq-len",
        str(length),
        "--batch-size",
        str(rows),
        "--gpu",
        "h100",
        "--json",
    )
    elapsed = time.perf_counter() - start
    assert code == 0, err
    assert elapsed < 5.0
    result = json.loads(out)
    tokens = rows * length
    layers, hidden = config.num_hidden_layers, config.hidden_size
    breakdown = result["breakdown"]
    assert result["tokens_per_step"] == tokens
    # A training step is 3 forward passes of 2 FLOPs per multiply-add (forward, then two backward matmuls).
    assert breakdown["mlp"] == pytest.approx(
        6 * tokens * 3 * hidden * config.intermediate_size * layers, rel=1e-9
    )
    assert breakdown["head"] == pytest.approx(6 * tokens * hidden * config.vocab_size, rel=1e-9)
    # Eager attention: Q K^T and the weighted sum of V, each length**2 * hidden multiply-adds per row and layer.
    assert breakdown["attention_scores"] == pytest.approx(
        6 * 2 * rows * length**2 * hidden * layers, rel=1e-9
    )
    assert result["model_flops_per_step"] == result["hardware_flops_per_step"]  # no padding, no recompute
    assert sum(breakdown.values()) == pytest.approx(result["model_flops_per_step"], rel=1e-12)  # float64 sums
    assert result["at_mfu"]["40%"]["step_seconds"] == pytest.approx(
        result["model_flops_per_step"] / (0.4 * 989.4e12)
    )


# -- bad input: one line naming the problem and the fix, exit code 2 -------------------------------
@pytest.fixture
def bad_files(tmp_path, config_file, llava_config_file):
    """Files a new user might hand the command line, by placeholder."""
    good = json.loads(config_file[0].read_text())
    files = {
        "{good}": config_file[0],
        "{list}": tmp_path / "list.json",
        "{latin1}": tmp_path / "latin1.json",
        "{zero_heads}": tmp_path / "zero_heads.json",
        "{negative_width}": tmp_path / "negative_width.json",
        "{negative_layers}": tmp_path / "negative_layers.json",
        "{llava}": llava_config_file[0],
        "{vit}": tmp_path / "vit.json",
        "{unknown_text_type}": tmp_path / "unknown_text_type.json",
        "{unknown_type}": tmp_path / "unknown_type.json",
        "{metrics}": tmp_path / "metrics.csv",
        "{empty_csv}": tmp_path / "empty" / "metrics.csv",
        "{foreign_csv}": tmp_path / "foreign.csv",
        "{latin1_csv}": tmp_path / "latin1" / "metrics.csv",
        "{empty_json}": tmp_path / "empty" / "trainer_state.json",
        "{truncated_json}": tmp_path / "truncated" / "trainer_state.json",
        "{foreign_json}": tmp_path / "package.json",
        "{empty_wandb}": tmp_path / "run-empty.wandb",
        "{foreign_wandb}": tmp_path / "run-foreign.wandb",
        "{folder}": tmp_path / "plots",
    }
    for folder in ("empty", "truncated", "latin1", "plots"):
        (tmp_path / folder).mkdir()
    files["{list}"].write_text(json.dumps([good]))
    latin1 = json.dumps({**good, "name_or_path": "caf\u00e9"}, ensure_ascii=False)
    files["{latin1}"].write_bytes(latin1.encode("latin-1"))
    files["{zero_heads}"].write_text(json.dumps({**good, "num_attention_heads": 0}))
    files["{negative_width}"].write_text(json.dumps({**good, "hidden_size": -8}))
    files["{negative_layers}"].write_text(json.dumps({**good, "num_hidden_layers": -1}))
    llava = json.loads(llava_config_file[0].read_text())
    llava["text_config"]["model_type"] = "not-a-model"
    files["{unknown_text_type}"].write_text(json.dumps(llava))
    files["{vit}"].write_text(ViTConfig(**TINY_VISION, image_size=32, patch_size=8).to_json_string())
    files["{unknown_type}"].write_text(json.dumps({**good, "model_type": "not-a-model"}))
    files["{metrics}"].write_text("step,train/mfu,train/loss\n1,0.4,2.0\n2,0.41,1.9\n")
    files["{empty_csv}"].write_text("")
    files["{foreign_csv}"].write_text("name,price\napple,3\n")
    files["{latin1_csv}"].write_bytes("step,train/mfu,note\n1,0.4,caf\u00e9\n".encode("latin-1"))
    files["{empty_json}"].write_text("")
    state = json.dumps(
        {"log_history": [{"step": 1, "mfu": 0.4, "loss": 2.0}, {"step": 2, "mfu": 0.41, "loss": 1.9}]}
    )
    files["{truncated_json}"].write_text(state[: len(state) // 2])
    files["{foreign_json}"].write_text(json.dumps({"name": "my-app", "version": "1.0.0"}))
    files["{empty_wandb}"].write_bytes(b"")
    files["{foreign_wandb}"].write_bytes(bytes(range(256)) * 4)
    return files


def estimate(*extra: str, config: str = "{good}", seq_len: str = "8", batch_size: str = "1") -> list[str]:
    return ["estimate", "--config", config, "--seq-len", seq_len, "--batch-size", batch_size, *extra]


BAD_INPUTS = {
    # estimate: the config file
    "config-json-list": (
        estimate(config="{list}"),
        ["list.json", "JSON list", "expected a Hugging Face config.json"],
    ),
    "config-not-utf8": (estimate(config="{latin1}"), ["latin1.json", "not UTF-8"]),
    "config-zero-heads": (estimate(config="{zero_heads}"), ["num_attention_heads is 0", "must be positive"]),
    "config-negative-width": (estimate(config="{negative_width}"), ["hidden_size is -8", "correct it"]),
    "config-negative-layers": (
        estimate(config="{negative_layers}"),
        ["num_hidden_layers is -1", "zero or more"],
    ),
    "config-vision-language": (
        estimate(config="{llava}"),
        ["LlavaConfig ('llava')", "vision-language model", "save the config's 'text_config'"],
    ),
    "config-needs-pixel-inputs": (
        estimate(config="{vit}"),
        ["ViTConfig ('vit')", "takes pixel_values", "mfu_callbacks.estimate_step_flops"],
    ),
    "config-unknown-model-type": (
        estimate(config="{unknown_type}"),
        ["'not-a-model' is not one that transformers", "upgrade transformers"],
    ),
    "config-unknown-sub-config-type": (
        estimate(config="{unknown_text_type}"),
        ["text_config.model_type 'not-a-model' is not one that transformers", "upgrade transformers"],
    ),
    "config-is-a-folder": (estimate(config="{folder}"), ["is a folder", "config.json"]),
    # estimate: the sizes
    "negative-lora-rank": (estimate("--lora-rank", "-1"), ["--lora-rank must be positive (got -1)"]),
    "lora-targets-without-rank": (estimate("--lora-targets", "q_proj"), ["--lora-targets needs --lora-rank"]),
    "lora-targets-not-in-model": (
        estimate("--lora-rank", "4", "--lora-targets", "qkv"),
        ["--lora-targets qkv", "linear layers are", "q_proj"],
    ),
    "zero-seq-len": (estimate(seq_len="0"), ["--seq-len must be positive (got 0)"]),
    "negative-seq-len": (estimate(seq_len="-8"), ["--seq-len must be positive (got -8)"]),
    "zero-batch-size": (estimate(batch_size="0"), ["--batch-size must be positive (got 0)"]),
    "negative-batch-size": (estimate(batch_size="-2"), ["--batch-size must be positive (got -2)"]),
    "dtype-the-gpu-lacks": (
        estimate("--gpu", "v100", "--dtype", "fp8"),
        ["no fp8 peak", "choose another --dtype"],
    ),
    # the command line itself
    "seq-len-not-a-number": (
        estimate(seq_len="4k"),
        ["invalid int value: '4k'", "mfu-callbacks estimate --help"],
    ),
    "required-option-missing": (
        ["estimate", "--config", "{good}"],
        ["--seq-len, --batch-size", "mfu-callbacks estimate --help"],
    ),
    "no-command": ([], ["required: COMMAND", "mfu-callbacks --help"]),
    # plot: the image
    "image-type-unsupported": (["plot", "{metrics}", "-o", "mfu.xyz"], ["cannot write .xyz images", ".png"]),
    "dpi-zero": (["plot", "{metrics}", "-o", "mfu.png", "--dpi", "0"], ["--dpi must be between 1 and"]),
    "dpi-negative": (["plot", "{metrics}", "-o", "mfu.png", "--dpi", "-5"], ["--dpi must be between 1 and"]),
    "dpi-too-large": (
        ["plot", "{metrics}", "-o", "mfu.png", "--dpi", "100000"],
        ["--dpi must be between 1 and"],
    ),
    "image-is-a-folder": (["plot", "{metrics}", "-o", "{folder}"], ["is a folder", "plots/mfu.png"]),
    "image-folder-missing": (
        ["plot", "{metrics}", "-o", "no-such-folder/mfu.png"],
        ["folder no-such-folder does not exist", "create it"],
    ),
    # plot: the run
    "run-missing": (
        ["plot", "no-such-run.csv"],
        ["no-such-run.csv", "expected an mfu-callbacks run summary"],
    ),
    "metrics-csv-empty": (
        ["plot", "{empty_csv}"],
        ["metrics.csv is empty", "expected a Lightning CSVLogger"],
    ),
    "csv-foreign": (
        ["plot", "{foreign_csv}"],
        ["foreign.csv has no step column", "name, price", "expected a Lightning CSVLogger"],
    ),
    "csv-not-utf8": (["plot", "{latin1_csv}"], ["metrics.csv", "expected a Lightning CSVLogger"]),
    "trainer-state-empty": (["plot", "{empty_json}"], ["trainer_state.json is empty", "expected a Trainer"]),
    "trainer-state-truncated": (
        ["plot", "{truncated_json}"],
        ["trainer_state.json is cut off", "expected a Trainer"],
    ),
    "json-foreign": (["plot", "{foreign_json}"], ["package.json has no 'log_history'", "expected a Trainer"]),
}
WANDB_INPUTS = {
    "wandb-log-empty": (["plot", "{empty_wandb}"], ["run-empty.wandb is empty", "expected the run-*.wandb"]),
    "wandb-log-foreign": (
        ["plot", "{foreign_wandb}"],
        ["wandb could not read", "run-foreign.wandb", "expected a W&B run log"],
    ),
}


def check_one_line_error(capsys, bad_files, argv, fragments) -> None:
    argv = [str(bad_files.get(item, item)) for item in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("mfu-callbacks: error: ")
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize(("argv", "fragments"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_the_problem_and_fix(
    capsys, tmp_path, monkeypatch, bad_files, argv, fragments
):
    monkeypatch.chdir(tmp_path)
    check_one_line_error(capsys, bad_files, argv, fragments)
    assert not (tmp_path / "mfu.xyz").exists() and not (tmp_path / "plots.png").exists()


@pytest.mark.parametrize(("argv", "fragments"), list(WANDB_INPUTS.values()), ids=list(WANDB_INPUTS))
def test_bad_wandb_log_exits_2_with_one_line(capsys, tmp_path, monkeypatch, bad_files, argv, fragments):
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    check_one_line_error(capsys, bad_files, argv, fragments)


def test_plot_to_a_name_without_extension_writes_and_reports_a_png(capsys, tmp_path, bad_files):
    code, out, err = run_cli(capsys, "plot", str(bad_files["{metrics}"]), "-o", str(tmp_path / "mfu"))
    assert code == 0, err
    assert f"wrote {tmp_path / 'mfu.png'}:" in out
    check_png(tmp_path / "mfu.png")


# -- the command line as a tool: fast help, plain text, one spelling, JSON errors ----------------------
COMMANDS = ("estimate", "plot", "compare", "doctor")


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from mfu_callbacks.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, stop.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "torch not imported"
    assert f"mfu-callbacks {mfu_callbacks.__version__}" in result.stdout
    assert "estimate" in result.stdout and "doctor" in result.stdout and "compare" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_plain_help_text(capsys, command):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", "**", ":func:", ":class:"):
        assert markup not in text, f"{markup!r} in {command} --help"
    (sub,) = (
        action.choices[command]
        for action in _parser(command)._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, (
            f"{command} {action.option_strings} has no help"
        )


def test_the_listing_shows_each_lazily_added_command_with_its_own_summary():
    for name, summary in _LAZY_COMMANDS.items():
        (subcommands,) = (
            action for action in _parser(name)._actions if isinstance(action, argparse._SubParsersAction)
        )
        (listed,) = (choice for choice in subcommands._choices_actions if choice.dest == name)
        assert listed.help == summary


@pytest.mark.slow  # over 2 s on a 2-core CPU: the unit tier stays under 3 minutes
def test_lora_r_is_a_deprecated_spelling_of_lora_rank_in_estimate_and_doctor(capsys, config_file):
    base = ["estimate", "--config", str(config_file[0]), "--seq-len", "16", "--batch-size", "1", "--json"]
    code, new, err = run_cli(capsys, *base, "--lora-rank", "4")
    assert code == 0 and not [line for line in err.splitlines() if line.startswith("mfu-callbacks:")]
    code, old, err = run_cli(capsys, *base, "--lora-r", "4")
    assert code == 0
    assert json.loads(old) == json.loads(new)
    ours = [line for line in err.splitlines() if line.startswith("mfu-callbacks:")]  # not the libraries' own
    assert ours == ["mfu-callbacks: warning: --lora-r is deprecated and will be removed; use --lora-rank"]
    for spelling in ("--lora-rank", "--lora-r"):
        args = _parser("doctor").parse_args(["doctor", *base[1:], spelling, "8"])
        assert args.lora_rank == 8
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv",
    [
        ["estimate", "--config", "{good}", "--seq-len", "0", "--batch-size", "1", "--json"],  # a bad value
        ["estimate", "--config", "{good}", "--json"],  # the command line itself
        ["estimate", "--config", "{good}", "--seq-len", "8", "--batch-size", "1", "--gpu", "h10", "--json"],
        ["doctor", "--config", "{good}", "--seq-len", "8", "--batch-size", "1", "--repeats", "0", "--json"],
        ["doctor", "--config", "no-such.json", "--seq-len", "8", "--batch-size", "1", "--json"],
        ["doctor", "--config", "{good}", "--seq-len", "eight", "--batch-size", "1", "--json"],
        ["compare", "no-such-run.csv", "other-run.csv", "--json"],
    ],
    ids=[
        "estimate-value",
        "estimate-usage",
        "estimate-gpu",
        "doctor-value",
        "doctor-file",
        "doctor-usage",
        "compare",
    ],
)
def test_json_errors_are_one_json_object_on_stdout_in_every_command(capsys, bad_files, argv):
    code, out, err = run_cli(capsys, *[str(bad_files.get(item, item)) for item in argv])
    assert code == 2
    result = json.loads(out)
    assert result["exit_code"] == 2 and result["error"]
    assert err.startswith("mfu-callbacks: error: ")


def test_an_unknown_gpu_lists_the_short_names_people_type(capsys, config_file):
    argv = ["estimate", "--config", str(config_file[0]), "--seq-len", "8", "--batch-size", "1"]
    code, _, err = run_cli(capsys, *argv, "--gpu", "h10")
    assert code == 2
    assert "unknown GPU 'h10': did you mean h100" in err
    known = err.split("known: ")[1]
    for short in ("h100", "h200", "a100", "l40s", "mi300x", "4090"):
        assert f"{short}," in known or f"{short} " in known
    assert "AMD Instinct" not in err and "NVIDIA H100 PCIe" not in err
    for short in short_gpu_names():  # every listed name is one that --gpu takes
        assert lookup_gpu(short) is not None
