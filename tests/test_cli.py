"""The ``mfu-callbacks`` command line: estimate and plot, and their error paths (exit code 2, one line)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mfu_callbacks import estimate_step_flops
from mfu_callbacks.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def config_file(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    return path, config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_estimate_matches_the_engine_on_the_real_model_and_a_gpu_peak(capsys, config_file):
    path, config = config_file
    code, out, _ = run_cli(capsys, "estimate", "--config", str(path), "--seq-len", "32", "--batch-size", "2",
                           "--gpu", "h100", "--json")
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


def test_estimate_with_lora_and_checkpointing_counts_less_model_work_and_more_hardware_work(capsys, config_file):
    path, _ = config_file
    base = ["estimate", "--config", str(path), "--seq-len", "32", "--batch-size", "2", "--json"]
    full = json.loads(run_cli(capsys, *base)[1])
    lora = json.loads(run_cli(capsys, *base, "--lora-r", "8", "--lora-targets", "q_proj,v_proj",
                              "--gradient-checkpointing")[1])
    assert lora["model_flops_per_step"] < full["model_flops_per_step"]  # no weight gradients of the frozen base
    assert lora["hardware_flops_per_step"] > lora["model_flops_per_step"]  # the recompute
    assert lora["breakdown"]["adapters"] > 0


def test_estimate_prints_a_table_a_person_can_read(capsys, config_file):
    path, _ = config_file
    code, out, _ = run_cli(capsys, "estimate", "--config", str(path), "--seq-len", "16", "--batch-size", "1",
                           "--gpu", "a100")
    assert code == 0
    assert "model FLOPs per token" in out and "at  40% MFU" in out and "NVIDIA A100" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "--config", "missing.json", "--seq-len", "8", "--batch-size", "1"], "config file not found"),
        (["estimate", "--config", "{bad}", "--seq-len", "8", "--batch-size", "1"], "cannot read"),
        (["estimate", "--config", "{no_type}", "--seq-len", "8", "--batch-size", "1"], "no 'model_type'"),
        (["estimate", "--config", "{good}", "--seq-len", "8", "--batch-size", "1", "--gpu", "h1000"], "known: "),
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
    state = {"log_history": [{"loss": 2.0, "mfu": 0.3, "step": 10}, {"loss": 1.5, "mfu": 0.32, "step": 20},
                             {"train_runtime": 5.0, "step": 20}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    code, out, _ = run_cli(capsys, "plot", str(tmp_path / "trainer_state.json"), "-o", str(tmp_path / "b.png"))
    assert code == 0 and "2 MFU points, 2 loss points" in out
    check_png(tmp_path / "b.png")


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
