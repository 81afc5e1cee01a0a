"""Hostile and broken inputs to every command: exit code 2, one line naming the problem, no traceback.

The corpus lives in ``tests/data/hostile`` (small files); files too big to keep are made here. Each
run-shaped file goes to ``compare`` and ``plot``, each config-shaped one to ``estimate`` and
``doctor``, with and without ``--json`` (then the error is also one JSON object on stdout).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from mfu_callbacks._input_files import MAX_MB_ENV
from mfu_callbacks.cli import main
from mfu_callbacks.runs.logs import read_run

CORPUS = Path(__file__).parents[1] / "data" / "hostile"
GOOD_RUN = CORPUS / "good_run"

# file in the corpus (or made by `made_files`) -> what the one line must say
RUN_FILES = {
    "deep.json": "nests deeper than 64 levels",
    "long_integer.json": "an integer of 400 digits",
    "empty.json": "is empty",
    "binary.json": "is binary, not text",
    "cut_off.json": "is cut off",
    "nan_in_setup": "holds NaN",
    "peak_as_text": "setup peak_tflops is '989.4' (str): expected a number",
    "window_long_integer": "line 6 holds an integer of 400 digits",
    "window_cut_midway": "line 3",
    "{huge}": "MB, more than the 1 MB read at most",
    "{mistyped_checkpoint}": "no such file or folder",
}
CONFIG_FILES = {
    "deep.json": "nests deeper than 64 levels",
    "deep_config.json": "nests deeper than 64 levels",
    "long_integer.json": "an integer of 400 digits",
    "empty.json": "is empty",
    "binary.json": "is binary, not text",
    "cut_off.json": "is cut off",
    "nan_in_setup/mfu_summary.json": "has no 'model_type'",
    "{huge}": "MB, more than the 1 MB read at most",
    "{many_layers}": "num_hidden_layers is 10,000,000, more than 10,000",
}
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}


@pytest.fixture
def made_files(tmp_path, monkeypatch):
    """Inputs made for the test: a file past the size limit (sparse: nothing is written), a checkpoint
    folder typed with the wrong number, configs with absurd sizes."""
    monkeypatch.setenv(MAX_MB_ENV, "1")
    huge = tmp_path / "trainer_state.json"
    with open(huge, "wb") as file:
        file.truncate(2_000_001)
    (tmp_path / "out" / "run1" / "checkpoint-450").mkdir(parents=True)
    (tmp_path / "out" / "run1" / "checkpoint-450" / "trainer_state.json").write_text('{"log_history": []}')
    monkeypatch.chdir(tmp_path)
    many_layers = tmp_path / "many_layers.json"
    many_layers.write_text(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 10**7}).to_json_string())
    return {
        "{huge}": str(huge),
        "{mistyped_checkpoint}": "out/run1/checkpoint-500",
        "{many_layers}": str(many_layers),
    }


def path_of(name: str, made: dict[str, str]) -> str:
    return made.get(name) or str(CORPUS / name)


def check_one_line(argv: list[str], capsys, fragment: str, *, as_json: bool) -> None:
    code = main([*argv, "--json"] if as_json else argv)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    ours = [line for line in captured.err.splitlines() if line.startswith("mfu-callbacks:")]
    assert len(ours) == 1 and ours[0].startswith("mfu-callbacks: error: "), captured.err
    assert "Traceback" not in captured.err
    assert fragment in ours[0], ours[0]
    if as_json:
        error = json.loads(captured.out)
        assert error["exit_code"] == 2 and fragment in error["error"]
    else:
        assert captured.out == ""


@pytest.mark.parametrize("name", list(RUN_FILES))
@pytest.mark.parametrize(
    ("command", "as_json"),
    [("compare", False), ("compare", True), ("plot", False)],
    ids=["compare", "compare-json", "plot"],
)
def test_a_hostile_run_exits_2_with_one_line(capsys, tmp_path, made_files, command, as_json, name):
    run = path_of(name, made_files)
    argv = (
        ["compare", str(GOOD_RUN), run]
        if command == "compare"
        else ["plot", run, "-o", str(tmp_path / "x.png")]
    )
    check_one_line(argv, capsys, RUN_FILES[name], as_json=as_json)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("name", list(CONFIG_FILES))
@pytest.mark.parametrize("command", ["estimate", "doctor"])
def test_a_hostile_config_exits_2_with_one_line(capsys, made_files, command, name, as_json):
    argv = [command, "--config", path_of(name, made_files), "--seq-len", "8", "--batch-size", "1"]
    check_one_line(argv, capsys, CONFIG_FILES[name], as_json=as_json)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seq-len", str(10**40), "--batch-size", "1"], "--seq-len must be at most 2,147,483,648"),
        (["--seq-len", "8", "--batch-size", str(10**12)], "--batch-size must be at most"),
        (["--seq-len", "8", "--batch-size", "1", "--lora-rank", str(10**13)], "--lora-rank must be at most"),
    ],
    ids=["seq-len", "batch-size", "lora-rank"],
)
@pytest.mark.parametrize("command", ["estimate", "doctor"])
def test_absurd_counts_exit_2_naming_the_option(capsys, tmp_path, command, extra, fragment):
    config = tmp_path / "config.json"
    config.write_text(LlamaConfig(**TINY_LLAMA).to_json_string())
    check_one_line([command, "--config", str(config), *extra], capsys, fragment, as_json=False)


@pytest.mark.parametrize(
    ("sizes", "extra", "fragment"),
    [
        ({"vocab_size": 10**12}, [], "from vocab_size 1,000,000,000,000 in"),
        (
            {},
            ["--seq-len", "100000000", "--batch-size", "1000"],
            "--batch-size x --seq-len (100,000,000,000 tokens)",
        ),
    ],
    ids=["vocabulary", "tokens"],
)
@pytest.mark.slow  # builds and traces the model (2 s)
def test_doctor_refuses_a_step_that_cannot_fit_before_allocating_it(capsys, tmp_path, sizes, extra, fragment):
    """A vocabulary of 10**12 makes a 64 x 10**12 embedding: the allocator's traceback today."""
    config = tmp_path / "config.json"
    config.write_text(LlamaConfig(**{**TINY_LLAMA, **sizes}).to_json_string())
    argv = ["doctor", "--config", str(config), *(extra or ["--seq-len", "8", "--batch-size", "1"])]
    check_one_line(argv, capsys, fragment, as_json=False)


def test_doctor_refuses_endless_repeats(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(LlamaConfig(**TINY_LLAMA).to_json_string())
    argv = [
        "doctor",
        "--config",
        str(config),
        "--seq-len",
        "8",
        "--batch-size",
        "1",
        "--repeats",
        str(10**11),
    ]
    check_one_line(argv, capsys, "--repeats must be from 1 to 10,000", as_json=False)


def test_a_truncated_last_window_is_a_run_still_being_written_and_reads(capsys, tmp_path):
    """A last line without its newline (read while the run writes it) is left out, not an error."""
    run = tmp_path / "running"
    run.mkdir()
    (run / "mfu_summary.json").write_text((GOOD_RUN / "mfu_summary.json").read_text())
    (run / "mfu_windows.jsonl").write_text((GOOD_RUN / "mfu_windows.jsonl").read_text() + '{"step": 6, "metr')
    assert len(read_run(run).windows) == len(read_run(GOOD_RUN).windows) == 5
    assert main(["compare", str(GOOD_RUN), str(run)]) in (
        0,
        1,
        3,
    )  # read: a verdict, or too few windows for one (never 2)
    assert "error" not in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_exit_2_not_a_traceback(capsys, monkeypatch):
    """Exit 1 means "a candidate dropped" to a CI gate: a bug must never read as that."""
    from mfu_callbacks.cli import compare

    def broken(args):
        raise KeyError("deliberate")

    monkeypatch.setattr(compare, "_compare", broken)
    code = main(["compare", str(GOOD_RUN), str(GOOD_RUN)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "internal error, KeyError" in err and "MFU_CLI_TRACEBACK=1" in err


@pytest.mark.slow  # a fresh interpreter imports torch (several seconds on a busy machine)
def test_the_installed_command_exits_2_with_one_line_on_a_deep_file():
    """The same through a real process: what a CI job sees."""
    code = "import sys; from mfu_callbacks.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "compare", str(GOOD_RUN), str(CORPUS / "deep.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "nests deeper than 64 levels" in result.stderr
