"""Run summaries and ``mfu-callbacks compare``: the file, the statistics, the gate, and every way a run can be unreadable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mfu_callbacks.cli import main
from mfu_callbacks.flops import StepFlops
from mfu_callbacks.hardware import PeakInfo
from mfu_callbacks.runs.compare import t_quantile, welch_difference
from mfu_callbacks.runs.logs import read_curves
from mfu_callbacks.runs.summary import (
    DEFAULT_FILENAME,
    FORMAT_VERSION,
    WINDOWS_FILENAME,
    RunSummary,
    describe_setup,
)

H100 = {
    "device": "NVIDIA H100 SXM",
    "peak_tflops": 989.4,
    "peak_source": "datasheet",
    "dtype": "bf16",
    "world_size": 8,
}
TOKENS_PER_STEP = 16384  # per GPU
FLOPS_PER_TOKEN = 6.0e9
STEP_SECONDS = 0.25
NOISE = 0.02  # relative spread of one window's step time


def windows(
    seed: int,
    count: int = 20,
    *,
    slower: float = 1.0,
    flops_per_token: float = FLOPS_PER_TOKEN,
    peak_tflops: float = 989.4,
) -> list[tuple[int, dict[str, float]]]:
    """Windows of a run whose step time is STEP_SECONDS × slower, with NOISE; the rest follows from it."""
    rng = random.Random(seed)
    result = []
    for index in range(count):
        seconds = STEP_SECONDS * slower * (1.0 + rng.gauss(0.0, NOISE))
        tokens_per_sec = TOKENS_PER_STEP / seconds
        flops_per_sec = tokens_per_sec * flops_per_token
        result.append(
            (
                10 * (index + 1),
                {
                    "mfu": flops_per_sec / (peak_tflops * 1e12),
                    "hfu": 1.1 * flops_per_sec / (peak_tflops * 1e12),
                    "tflops_per_gpu": flops_per_sec / 1e12,
                    "tokens_per_sec": 8 * tokens_per_sec,
                    "tokens_per_sec_per_gpu": tokens_per_sec,
                    "step_time": seconds,
                    "padding_fraction": 0.05,
                    "input_wait_fraction": 0.01 + rng.random() * 0.002,
                },
            )
        )
    return result


def summary_file(folder, name: str, seed: int, setup: dict | None = None, **options) -> str:
    summary = RunSummary(
        H100 if setup is None else setup, versions={"torch": "2.11.0", "mfu_callbacks": "0.1.0"}
    )
    for step, values in windows(seed, **options):
        summary.add_window(step, values)
    return str(summary.write(folder / name / DEFAULT_FILENAME))


def compare(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["compare", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- statistics -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probability", "df", "printed"),
    [
        # Student's t table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2), three decimals
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 5, 2.571),
        (0.975, 10, 2.228),
        (0.975, 30, 2.042),
        (0.95, 10, 1.812),
        (0.995, 4, 4.604),
        (0.975, 100, 1.984),
        (0.975, float("inf"), 1.960),
    ],
)
def test_t_quantile_matches_the_printed_table(probability, df, printed):
    assert t_quantile(probability, df) == pytest.approx(printed, abs=6e-4)


def test_t_quantile_between_table_rows_for_fractional_df():
    assert t_quantile(0.975, 5) > t_quantile(0.975, 5.5) > t_quantile(0.975, 6)


def test_welch_interval_covers_the_true_difference_about_as_often_as_it_says():
    rng = random.Random(7)
    covered = 0
    trials = 400
    for _ in range(trials):
        baseline = [rng.gauss(1.0, 0.05) for _ in range(8)]
        candidate = [rng.gauss(1.03, 0.15) for _ in range(12)]  # unequal variances and sizes: Welch's case
        difference = welch_difference(baseline, candidate, 0.95, points=True)
        covered += difference.low <= 3.0 <= difference.high  # 0.03 in percentage points
    assert 0.92 <= covered / trials <= 0.98


def test_welch_difference_is_relative_to_the_baseline_mean():
    difference = welch_difference([2.0, 2.2, 1.8], [2.4, 2.6, 2.2], 0.95)
    assert difference.estimate == pytest.approx(20.0)
    assert difference.low < 20.0 < difference.high
    assert welch_difference([1.0], [1.0, 2.0], 0.95) is None


# -- the run summary --------------------------------------------------------------------------------
def test_summary_round_trip_is_atomic_and_keeps_the_previous_file_on_a_failed_write(tmp_path, monkeypatch):
    summary = RunSummary(H100)
    summary.add_window(10, {"mfu": 0.41, "step_time": 0.2, "hfu": float("nan")})
    path = summary.write(tmp_path)  # a folder gets mfu_summary.json
    assert path == tmp_path / DEFAULT_FILENAME
    document = json.loads(path.read_text())
    assert document["format_version"] == FORMAT_VERSION
    windows = (tmp_path / document["windows_file"]).read_text().splitlines()
    assert [json.loads(line) for line in windows] == [
        {"step": 10, "metrics": {"mfu": 0.41, "step_time": 0.2}}
    ]
    assert {"torch", "mfu_callbacks"} <= set(document["versions"])

    summary.add_window(20, {"mfu": 0.43})

    def crash(source, target):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError):
        summary.write(path)
    # No temporary file left behind.
    assert sorted(file.name for file in tmp_path.iterdir()) == [DEFAULT_FILENAME, WINDOWS_FILENAME]
    assert len(RunSummary.read(path).windows) == 1  # the previous complete file
    monkeypatch.undo()
    summary.write(path)
    again = RunSummary.read(tmp_path)
    assert [window["step"] for window in again.windows] == [10, 20]
    assert again.setup == H100


def test_setup_describes_peak_flops_and_a_lora_model():
    from tests.conftest import tiny_llama

    model = tiny_llama(lora=True)
    peak = PeakInfo(989.4e12, "NVIDIA H100 SXM", "bf16", "NVIDIA H100 datasheet")
    flops = StepFlops(
        model_flops=3000,
        hardware_flops=3600,
        tokens=10,
        padded_tokens=12,
        breakdown={"linear": 2500, "attention": 500, "adapters": 0},
    )
    setup = describe_setup(peak=peak, world_size=4, flops=flops, model=model)
    assert setup["device"] == "NVIDIA H100 SXM" and setup["dtype"] == "bf16"
    assert setup["peak_tflops"] == pytest.approx(989.4) and setup["peak_source"] == "NVIDIA H100 datasheet"
    assert setup["world_size"] == 4
    assert setup["model_flops_per_token"] == 300
    assert setup["flops_breakdown_per_token"] == {"attention": 50, "linear": 250}
    fingerprint = setup["model"]
    assert fingerprint["architecture"] == "LlamaForCausalLM"
    assert fingerprint["parameters"] == sum(parameter.numel() for parameter in model.parameters())
    assert 0 < fingerprint["trainable_parameters"] < fingerprint["parameters"]
    assert fingerprint["lora"] == {
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "adapter": "default",
    }
    assert "transformers" in RunSummary(setup).versions and "peft" in RunSummary(setup).versions
    assert "lora" not in describe_setup(model=tiny_llama())["model"]


def test_compare_gives_a_run_the_figures_of_its_own_report(capsys, tmp_path):
    """A real meter on a tiny LoRA model writes the run summary as a training run does (a window per read,
    the run's totals at the end); compare's figures for that run are its end-of-run report's, the steps
    after the last read included, not a mean of the windows' ratios."""
    import torch

    from mfu_callbacks._options import MFUOptions
    from mfu_callbacks._session import MeterSession
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(lora=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    session = MeterSession(MFUOptions(peak_tflops=0.5, warmup_steps=1), "test")
    session.write_summary_to(tmp_path / "main")
    session.attach(model)
    session.watch_forward(model)
    for step in range(1, 14):
        length = 8 if step % 3 else 24  # uneven steps: a mean of window ratios would not be the run's
        batch = {"input_ids": torch.randint(0, 64, (2, length))}
        batch["labels"] = batch["input_ids"]
        session.begin_step(batch)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.end_step()
        if step % 2 == 0:
            session.read()
    report = session.finish()  # step 13 is read here only: in the run's totals, in no window
    printed = capsys.readouterr().out
    written = RunSummary.read(tmp_path / "main")
    assert len(written.windows) == 6 and all("totals" in window for window in written.windows)
    assert written.totals is not None and written.totals["steps"] == 12  # 13 steps, the first one warm-up
    assert written.setup["dtype"] == "fp32" and written.setup["model"]["lora"]["r"] == 4

    # On a CPU the windows spread widely: the gate is not what this test is about.
    code, out, _ = compare(
        capsys, str(tmp_path / "main"), str(tmp_path / "main"), "--json", "--max-drop", "1000"
    )
    assert code == 0
    (candidate,) = json.loads(out)["candidates"]
    assert candidate["figures_from"] == "run totals"
    for key in ("mfu", "hfu", "tflops_per_gpu", "tokens_per_sec_per_gpu"):
        assert candidate["means"][key] == pytest.approx(report[key], rel=1e-12), key
    window_mean = sum(window["metrics"]["mfu"] for window in written.windows) / len(written.windows)
    assert candidate["means"]["mfu"] != pytest.approx(window_mean, rel=1e-6)
    assert candidate["differences"]["mfu"]["estimate"] == pytest.approx(0.0, abs=1e-9)
    code, out, _ = compare(capsys, str(tmp_path / "main"), str(tmp_path / "main"))
    shown = f"{100 * report['mfu']:.1f}%"
    assert f"MFU {shown}" in printed and shown in next(
        line for line in out.splitlines() if line.startswith("MFU")
    )


# -- comparing ---------------------------------------------------------------------------------------
def test_a_rerun_of_the_same_configuration_passes_the_gate(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    rerun = summary_file(tmp_path, "rerun", seed=2)
    code, out, err = compare(capsys, baseline, rerun, "--max-drop", "2")
    assert code == 0, out + err
    assert "rerun: no difference within noise" in out
    assert "gate on mfu: pass" in out
    for label in (
        "MFU",
        "HFU",
        "TFLOP/s per GPU",
        "tokens/s per GPU",
        "step time",
        "FLOPs per token",
        "padding",
        "input wait",
        "NVIDIA H100 SXM",
        "989.4",
        "bf16",
    ):
        assert label in out


def test_a_run_ten_percent_slower_fails_the_gate_with_the_right_size(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    slower = summary_file(tmp_path, "pr", seed=2, slower=1.10)
    code, out, _ = compare(capsys, baseline, slower, "--json")
    assert code == 1
    result = json.loads(out)
    assert result["exit_code"] == 1 and result["method"] == "welch-t on log ratios"
    (candidate,) = result["candidates"]
    assert candidate["verdict"] == "slower"
    mfu = candidate["differences"]["mfu"]
    true_change = 100 * (1 / 1.10 - 1)  # -9.09%: MFU and tokens/s fall as 1/step time
    assert mfu["low"] <= true_change <= mfu["high"] and mfu["high"] < -2
    step_time = candidate["differences"]["step_time"]
    assert step_time["low"] <= 10.0 <= step_time["high"]
    assert candidate["gate"]["failed"] and candidate["gate"]["change"]["high"] < -2
    assert candidate["differences"]["model_flops_per_token"]["estimate"] == pytest.approx(0.0, abs=1e-9)

    code, out, _ = compare(capsys, baseline, slower, "--max-drop", "12")  # a 9% drop is within a 12% budget
    assert code == 0 and "pr: slower" in out


def test_the_gate_watches_the_metric_named_and_turns_step_time_around(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    faster = summary_file(tmp_path, "pr", seed=3, slower=0.8)
    code, out, _ = compare(capsys, baseline, faster, "--metric", "step_time", "--json")
    assert code == 0
    candidate = json.loads(out)["candidates"][0]
    assert candidate["verdict"] == "faster"
    assert candidate["gate"]["change"]["estimate"] > 15  # step time fell by 20%: a gain, not a drop
    slower = summary_file(tmp_path, "slow", seed=4, slower=1.2)
    assert compare(capsys, baseline, slower, "--metric", "step_time")[0] == 1


@pytest.mark.parametrize(
    ("key", "value", "word"), [("device", "NVIDIA A100 SXM4 80GB", "GPUs"), ("dtype", "fp8", "dtypes")]
)
def test_runs_on_other_gpus_or_dtypes_are_refused_unless_allowed(capsys, tmp_path, key, value, word):
    baseline = summary_file(tmp_path, "main", seed=1)
    other = summary_file(tmp_path, "other", seed=2, setup={**H100, key: value})
    code, out, err = compare(capsys, baseline, other)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"other {word}" in err and value in err and "--allow-mismatch" in err
    code, out, _ = compare(capsys, baseline, other, "--allow-mismatch")
    assert code == 0 and value in out and "notes:" in out


def test_different_flops_per_token_say_which_figure_answers_which_question(capsys, tmp_path):
    full = summary_file(tmp_path, "full", seed=1)
    lora = summary_file(tmp_path, "lora", seed=2, flops_per_token=0.7 * FLOPS_PER_TOKEN, slower=0.8)
    code, out, _ = compare(capsys, full, lora)
    assert code == 1  # MFU fell 12.5% although each step is 20% shorter
    assert "lora: faster" in out
    assert "FLOPs per token differ" in out and "tokens/s per GPU answers 'is it faster'" in out
    assert "MFU answers 'does it use the GPU better'" in out


def test_a_run_killed_mid_way_still_compares(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    killed = RunSummary(H100)
    path = tmp_path / "killed" / DEFAULT_FILENAME
    for step, values in windows(5, count=50)[:4]:  # written after every window, then the process died
        killed.add_window(step, values)
        killed.write(path)
    code, out, _ = compare(capsys, baseline, str(path), "--min-windows", "4", "--max-drop", "5")
    assert code == 0
    assert "4 of 4" in out and "20 of 20" in out


def test_too_few_windows_give_no_verdict_and_exit_code_3(capsys, tmp_path):
    """Three windows used to pass the gate with an interval of ±127%: now no verdict, either way."""
    baseline = summary_file(tmp_path, "main", seed=1)
    short = summary_file(tmp_path, "short", seed=2, count=3)
    code, out, _ = compare(capsys, baseline, short)
    assert code == 3 and "FAIL" not in out and "pass" not in out
    assert "not enough windows to decide: short has 3 window(s) with mfu" in out and "--min-windows" in out
    much_slower = summary_file(tmp_path, "much-slower", seed=3, count=3, slower=2.0)
    code, out, _ = compare(capsys, baseline, much_slower, "--json")
    assert code == 3 and json.loads(out)["candidates"][0]["gate"]["verdict"] == "undecided"
    # Enough windows, but an interval wider than the drop it must see: still no verdict.
    noisy = summary_file(tmp_path, "noisy", seed=4, count=6)
    code, out, _ = compare(capsys, baseline, noisy, "--min-windows", "3", "--max-drop", "0.5")
    assert code == 3 and "is wider than ±0.5%" in out
    assert compare(capsys, baseline, noisy, "--min-windows", "3", "--max-drop", "10")[0] == 0
    code, _, err = compare(capsys, baseline, short, "--warmup-windows", "3")
    assert code == 2 and "no window with mfu after warm-up" in err and "--warmup-windows" in err


def test_intervals_are_log_ratios_that_never_reach_minus_100_percent(capsys, tmp_path):
    """A candidate at a fifth of the baseline's speed, with few noisy windows: the interval stays above
    -100% and is even in the log (the estimate is the ratio of the figures)."""
    baseline = summary_file(tmp_path, "main", seed=1, count=5)
    crawl = summary_file(tmp_path, "crawl", seed=2, count=5, slower=5.0)
    code, out, _ = compare(capsys, baseline, crawl, "--json")
    (candidate,) = json.loads(out)["candidates"]
    mfu = candidate["differences"]["mfu"]
    assert -100 < mfu["low"] < mfu["estimate"] < mfu["high"] < 0
    assert mfu["estimate"] == pytest.approx(
        100 * (candidate["means"]["mfu"] / json.loads(out)["baseline"]["means"]["mfu"] - 1)
    )
    assert (1 + mfu["low"] / 100) * (1 + mfu["high"] / 100) == pytest.approx((1 + mfu["estimate"] / 100) ** 2)
    assert code == 1


def csv_run(folder, seed: int) -> str:
    """A Lightning CSVLogger metrics.csv: a loss row, then a row with loss and MFU every tenth step (no
    setup recorded); steps 0-based, as Lightning writes them (the step the summary calls 10 is 9)."""
    folder.mkdir(parents=True)
    names = ["epoch", "step", "train/loss", *(f"train/{key}" for key in windows(0, 1)[0][1])]
    lines = [",".join(names)]
    for step, values in windows(seed):
        lines.append(f"0,{step - 2},2.0" + "," * len(values))
        lines.append(f"0,{step - 1},1.9," + ",".join(repr(value) for value in values.values()))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_lightning_csv_and_trainer_state_compare_with_a_summary(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    lightning = csv_run(tmp_path / "lightning_logs" / "version_0", seed=2)
    state = {
        "log_history": [{"loss": 1.5, "step": step, **values} for step, values in windows(3)]
        + [{"train_runtime": 50.0, "step": 200}]
    }
    (tmp_path / "hf" / "checkpoint-200").mkdir(parents=True)
    (tmp_path / "hf" / "checkpoint-200" / "trainer_state.json").write_text(json.dumps(state))
    code, out, _ = compare(capsys, baseline, lightning, str(tmp_path / "hf"), "--names", "main,pl,hf")
    assert code == 0, out
    assert "Lightning metrics.csv" in out and "Trainer state" in out
    assert "pl:" in out and "hf:" in out and "FAIL" not in out
    assert "device and dtype not checked against main (pl (Lightning metrics.csv) records none)" in out
    assert len(read_curves(lightning).loss) == 40  # plot still reads the loss beside MFU
    # One step convention: Lightning's 0-based steps read as the summary's and the Trainer's 1-based ones.
    steps = [step for step, _ in windows(1)]
    assert [step for step, _ in read_curves(lightning).mfu] == steps
    assert [step for step, _ in read_curves(baseline).mfu] == steps
    assert [step for step, _ in read_curves(str(tmp_path / "hf")).mfu] == steps


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (
            "",
            DEFAULT_FILENAME,
            "is empty: expected a Trainer trainer_state.json (saved in each checkpoint-N folder) or an "
            "mfu-callbacks run summary",
        ),
        ("{half", DEFAULT_FILENAME, "is cut off"),
        (
            '{"name": "left-pad", "version": "1.3.0"}',
            "package.json",
            "has no 'log_history' (nor a run summary's 'format')",
        ),
        (
            '{"format": "mfu-callbacks run summary", "format_version": 99, "windows": []}',
            "new.json",
            "version 99",
        ),
        (
            '{"format": "mfu-callbacks run summary", "format_version": 1, "windows": [{"step": 1}]}',
            "bad.json",
            "window 0 is not",
        ),
        ("epoch,step,val/acc\n0,1,0.5\n", "metrics.csv", "no MFU metrics in"),
        ("hello", "notes.txt", "expected an mfu-callbacks run summary (mfu_summary.json), a W&B run"),
        (None, "missing.json", "no such file or folder"),
        (None, "empty-folder", "holds none of"),
    ],
)
def test_unreadable_runs_get_one_line_naming_the_file_and_what_was_expected(
    capsys, tmp_path, content, name, message
):
    baseline = summary_file(tmp_path, "main", seed=1)
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    elif name == "empty-folder":
        path.mkdir()
    if name == DEFAULT_FILENAME and content:  # a summary cut short while copied
        whole = (tmp_path / "main" / DEFAULT_FILENAME).read_text()
        path.write_text(whole[: len(whole) // 2])
    code, out, err = compare(capsys, baseline, str(path), "--json")
    assert code == 2
    assert message in err and name in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads(out)["exit_code"] == 2


def test_three_runs_side_by_side_and_the_worst_decides_the_exit_code(capsys, tmp_path):
    runs = [
        summary_file(tmp_path, "main", seed=1),
        summary_file(tmp_path, "same", seed=2),
        summary_file(tmp_path, "slow", seed=3, slower=1.10),
    ]
    code, out, _ = compare(capsys, *runs)
    assert code == 1
    header = out.splitlines()[0]
    assert header.split()[:3] == ["main", "same", "vs"] and "slow" in header
    assert "same: no difference within noise" in out and "slow: slower" in out and "FAIL" in out


@pytest.mark.slow  # W&B's offline run read back by its own reader (a subprocess): CI's second tier
def test_a_real_wandb_offline_run_against_a_summary(capsys, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="compare", dir=str(tmp_path))
    run.config.update({"mfu_callbacks": {"device": "NVIDIA H100 SXM", "dtype": "bf16", "peak_tflops": 989.4}})
    for step, values in windows(seed=2, slower=1.10):
        run.log(
            {
                "train/loss": 2.0,
                "train/global_step": step,
                **{f"train/{key}": value for key, value in values.items()},
            }
        )
    run.finish()
    wandb.teardown()
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    baseline = summary_file(tmp_path, "main", seed=1)
    code, out, _ = compare(capsys, baseline, str(folder), "--json")
    assert code == 1
    (candidate,) = json.loads(out)["candidates"]
    assert candidate["kind"] == "W&B run" and candidate["label"] == folder.name
    assert candidate["setup"]["device"] == "NVIDIA H100 SXM"  # read from the W&B run's config
    assert candidate["windows"] == 20 and candidate["verdict"] == "slower"
    mfu = candidate["differences"]["mfu"]
    assert mfu["low"] <= 100 * (1 / 1.10 - 1) <= mfu["high"]

    foreign = tmp_path / "run-foreign.wandb"
    foreign.write_text("root:x:0:0:root:/root:/bin/bash\n")
    code, _, err = compare(capsys, baseline, str(foreign))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "wandb could not read" in err and str(foreign) in err and "expected a W&B run log" in err


def test_compare_help_names_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "mfu-callbacks compare" in text and "exit codes" in text and "Welch" in text


def test_a_folder_of_several_runs_says_which_one_it_read(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    summary_file(tmp_path / "sweep", "lr-1e-4", seed=2)
    summary_file(tmp_path / "sweep", "lr-3e-4", seed=3)
    code, out, _ = compare(capsys, baseline, str(tmp_path / "sweep"))
    assert (
        code == 0 and "holds 2 files like mfu_summary.json: read the last by name" in out and "lr-3e-4" in out
    )


def test_a_run_without_a_peak_gates_on_throughput_instead(capsys, tmp_path):
    baseline = summary_file(tmp_path, "main", seed=1)
    summary = RunSummary({"device": "NVIDIA H100 SXM", "dtype": "bf16"})
    for step, values in windows(2):
        summary.add_window(step, {key: value for key, value in values.items() if key not in ("mfu", "hfu")})
    no_peak = str(summary.write(tmp_path / "no-peak"))
    code, _, err = compare(capsys, baseline, no_peak)
    assert code == 2 and "did not log mfu" in err and "--metric tokens_per_sec_per_gpu" in err
    code, out, _ = compare(capsys, baseline, no_peak, "--metric", "tokens_per_sec_per_gpu")
    assert code == 0 and "gate on tokens_per_sec_per_gpu: pass" in out


def test_plot_overlays_several_runs_with_a_legend(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    runs = [
        csv_run(tmp_path / "a" / "version_0", seed=1),
        csv_run(tmp_path / "b" / "version_0", seed=2),
        summary_file(tmp_path, "c", seed=3),
    ]
    code = main(["plot", *runs, "-o", str(tmp_path / "runs.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "a/version_0 (20 MFU, 40 loss points), b/version_0 (20 MFU, 40 loss points), c (20 MFU, 0 loss points)"
        in out
    )
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_recorded_h100_runs_give_the_verdicts_of_benchmarks_results(capsys):
    """Run summaries written on an H100 (benchmarks/bench_compare_vocab.py): the unaligned vocabulary
    fails the gate, the rerun of the baseline passes it."""
    from mfu_callbacks.cli import main

    recorded = Path(__file__).parents[2] / "benchmarks" / "results" / "compare_vocab"
    baseline = str(recorded / "vocab-32064.json")
    assert main(["compare", baseline, str(recorded / "vocab-32064-rerun.json"), "--max-drop", "2"]) == 0
    capsys.readouterr()
    assert main(["compare", baseline, str(recorded / "vocab-32001.json"), "--max-drop", "2", "--json"]) == 1
    (candidate,) = json.loads(capsys.readouterr().out)["candidates"]
    assert round(candidate["differences"]["mfu"]["estimate"], 1) == -18.2
