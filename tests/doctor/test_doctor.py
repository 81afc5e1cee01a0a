"""``mfu-callbacks doctor`` on a tiny config, on the CPU.

The timings of a CPU say nothing about a GPU; what is checked is what could be wrong anywhere: the
shape list is complete (its FLOPs are those torch's FlopCounterMode counts on the real model, and
those of the FLOP engine), the counts per step, the arithmetic of the floor, the ceiling and the
prediction, the packed layout, the padded shapes, and the error paths.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, T5Config

import mfu_callbacks.doctor as doctor_module
from mfu_callbacks.cli import main
from mfu_callbacks.flops import FlopEngine
from mfu_callbacks.testing import reference_step_flops
from tests.conftest import make_eager

ROWS, LENGTH = 2, 24  # 48 tokens: no size of the model equals the token count
CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1001,  # off 8: its shapes get padded variants
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("doctor") / "config.json"
    path.write_text(LlamaConfig(**CONFIG).to_json_string())
    return path


def doctor(path, *extra: str) -> dict:
    """The JSON of one doctor run (the capture is done by hand: a module-scoped fixture has no capsys)."""
    argv = ["doctor", "--config", str(path), "--batch-size", str(ROWS), "--seq-len", str(LENGTH)]
    rounds = [] if "--rounds" in extra else ["--rounds", "1"]  # one round keeps the tests quick
    argv += ["--repeats", "1", "--peak-tflops", "0.5", "--json", *rounds, *extra]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def full(config_path):
    return doctor(config_path)


@pytest.fixture(scope="module")
def lora(config_path):
    return doctor(config_path, "--lora-rank", "4")


def real_model(lora_rank: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_eager(LlamaForCausalLM(LlamaConfig(**CONFIG)))
    if lora_rank:
        model = get_peft_model(
            model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear")
        )
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, CONFIG["vocab_size"], (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def flops_of(rows: list[dict]) -> float:
    return sum(row["flops"] * row["count"] for row in rows)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_shapes_hold_every_flop_torch_counts(full, lora, lora_rank):
    result = lora if lora_rank else full
    model = real_model(lora_rank)
    truth = reference_step_flops(model, batch())
    assert flops_of(result["matmuls"]) + flops_of(result["attention"]) == truth
    step = FlopEngine.from_model(model, batch()).estimate(batch())
    assert result["model_flops_per_step"] == step.model_flops == truth
    assert flops_of(result["attention"]) == step.breakdown["attention_scores"]


def test_the_counts_are_those_of_the_layers(full, lora):
    hidden, inner, vocab, layers, tokens = 64, 96, 1001, 2, ROWS * LENGTH
    head = [row for row in full["matmuls"] if "lm_head" in row["layers"]]
    # The head runs once each: forward (tokens x hidden x vocab), input and weight gradient.
    assert sorted((row["m"], row["k"], row["n"], row["count"]) for row in head) == [
        (tokens, hidden, vocab, 1),
        (tokens, vocab, hidden, 1),
        (vocab, tokens, hidden, 1),
    ]
    # The MLP's weight gradients: gate and up (inner x hidden) in each layer, down (hidden x inner).
    wgrad = Counter(
        (row["m"], row["n"]) for row in full["matmuls"] if row["k"] == tokens for _ in range(row["count"])
    )
    assert wgrad[(inner, hidden)] == 2 * layers and wgrad[(hidden, inner)] == layers
    (attention,) = full["attention"]
    assert attention["count"] == layers and attention["backward"] and attention["causal"]
    assert (attention["batch"], attention["heads"], attention["kv_heads"], attention["q_len"]) == (
        ROWS,
        4,
        2,
        LENGTH,
    )
    # Under LoRA the frozen base has no weight gradients: only the adapters' (rank 4) are computed.
    assert all(4 in (row["m"], row["n"]) for row in lora["matmuls"] if row["k"] == tokens)


def test_the_floor_ceiling_and_prediction_add_up(full):
    floor = sum(row["seconds"] * row["count"] for row in full["matmuls"] + full["attention"])
    assert full["floor_seconds"] == pytest.approx(floor, rel=1e-12)
    parts = full["parts"]
    assert {name: part["how"] for name, part in parts.items()} == {
        "matmuls": "measured",
        "attention": "measured",
        "optimizer": "measured",
        "other_ops": "measured",
        "other_ops_modelled": "modelled",
    }
    assert full["predicted_seconds"] == pytest.approx(
        sum(part["seconds"] for part in parts.values()), rel=1e-12
    )
    assert full["mfu_ceiling"] == pytest.approx(full["model_flops_per_step"] / floor / 0.5e12, rel=1e-12)
    assert full["predicted_mfu"] < full["mfu_ceiling"]
    other = full["other_ops"]
    assert other["ops"] > 0 and other["bytes"] > 0 and other["copy_bandwidth_gb_per_s"] > 0
    assert other["modelled_ops"] == 0, "every op of a Llama step replays on made-up data"
    parameters = sum(p.numel() for p in real_model().parameters())
    assert full["optimizer"]["parameters"] == parameters


def test_ops_that_cannot_be_replayed_are_modelled_from_their_bytes(config_path, monkeypatch):
    monkeypatch.setattr(doctor_module, "time_op", lambda call, timer: None)
    result = doctor(config_path)
    other, parts = result["other_ops"], result["parts"]
    assert other["modelled_ops"] == other["ops"] and parts["other_ops"]["seconds"] == 0
    # Each op takes its bytes over the copy bandwidth, and never less than a tiny kernel.
    modelled = parts["other_ops_modelled"]["seconds"]
    by_bytes = other["bytes"] / (other["copy_bandwidth_gb_per_s"] * 1e9)
    by_launches = other["ops"] * other["tiny_kernel_seconds"]
    assert max(by_bytes, by_launches) <= modelled * (1 + 1e-12) and modelled <= by_bytes + by_launches


def test_shapes_off_the_alignment_are_timed_padded(full):
    forward = next(row for row in full["matmuls"] if row["layers"] == "lm_head fwd")
    assert set(forward["padded_seconds"]) == {f"{ROWS * LENGTH}x64x1008", f"{ROWS * LENGTH}x64x1024"}
    aligned = [
        row
        for row in full["matmuls"]
        if all(size % 64 == 0 or size == 48 for size in (row["m"], row["k"], row["n"]))
    ]
    assert aligned and all(not row["padded_seconds"] for row in aligned)


def test_packed_rows_are_timed_as_the_model_calls_attention_on_them(config_path, full, monkeypatch):
    # What the model really does with a packed row (restarting position_ids, no mask), on the CPU.
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **options):
        calls.append((query.shape[0], query.shape[-2], attn_mask is not None, is_causal))
        return sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **options
        )

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
    positions = torch.arange(LENGTH).repeat(ROWS)[None]
    model(input_ids=torch.ones(1, ROWS * LENGTH, dtype=torch.long), position_ids=positions)
    monkeypatch.undo()
    (attention,) = doctor(config_path, "--packed")["attention"]
    batch, length, masked, causal = calls[0]
    assert (attention["batch"], attention["q_len"]) == (batch, length) == (1, ROWS * LENGTH)
    assert (attention["masked"], attention["causal"]) == (masked, causal)
    assert attention["segments"] == (ROWS if masked else 1)
    assert attention["count"] == CONFIG["num_hidden_layers"]


def test_packed_rows_keep_the_matmuls_and_model_flops_of_the_full_rows(config_path, full):
    packed = doctor(config_path, "--packed")
    assert Counter(json.dumps(row) for row in _shapes(packed)) == Counter(
        json.dumps(row) for row in _shapes(full)
    )
    assert packed["model_flops_per_step"] == full["model_flops_per_step"]


def _shapes(result: dict) -> list[dict]:
    return [{key: row[key] for key in ("m", "k", "n", "count", "a_t", "b_t")} for row in result["matmuls"]]


def test_the_table_names_what_is_measured_and_modelled(capsys, config_path):
    assert (
        main(
            ["doctor", "--config", str(config_path), "--batch-size", "1", "--seq-len", "8", "--repeats", "1"]
            + ["--rounds", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    for text in ("compute floor", "measured: matmuls", "replayed", "AdamW", "lm_head fwd", "predicted step"):
        assert text in out
    assert out.count("over 2 rounds (") == 2  # the floor's and the prediction's spread
    assert "no peak for this device: pass --peak-tflops" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--repeats", "0"], "--repeats must be from 1 to 10,000 (got 0)"),
        (["--rounds", "0"], "--rounds must be from 1 to 1,000 (got 0)"),
        (["--peak-tflops", "-3"], "--peak-tflops must be a positive number"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, config_path, extra, message):
    argv = ["doctor", "--config", str(config_path), "--batch-size", "1", "--seq-len", "8", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_encoder_decoder_is_refused(capsys, tmp_path):
    path = tmp_path / "t5.json"
    path.write_text(
        T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, vocab_size=128).to_json_string()
    )
    assert main(["doctor", "--config", str(path), "--batch-size", "1", "--seq-len", "8"]) == 2
    assert "doctor times decoder-only language models" in capsys.readouterr().err


@pytest.mark.slow  # three rounds of real timings
def test_every_piece_is_timed_in_each_round_and_the_figures_are_medians(config_path):
    result = doctor(config_path, "--rounds", "3")
    assert result["rounds"] == 3
    floor = sum(row["seconds"] * row["count"] for row in result["matmuls"] + result["attention"])
    assert result["floor_seconds"] == pytest.approx(floor, rel=1e-12)
    assert result["floor_spread_seconds"] >= 0 and result["predicted_spread_seconds"] >= 0
    assert all(row["spread_seconds"] >= 0 for row in result["matmuls"] + result["attention"])


def noisy_machine(monkeypatch, slow_round: float) -> None:
    """GEMMs take 1 ms, 0.9 ms once padded to a multiple of 8, except that the second timing of every
    shape runs ``slow_round`` times slower (another job on the machine)."""
    calls: Counter = Counter()

    def time_matmul(shape, dtype, timer):
        calls[shape] += 1
        aligned = all(size % 8 == 0 for size in (shape.m, shape.k, shape.n))
        return (0.9e-3 if aligned else 1e-3) * (slow_round if calls[shape] == 2 else 1.0)

    monkeypatch.setattr(doctor_module, "time_matmul", time_matmul)
    # The rest is not what this test is about: constant, and instant.
    monkeypatch.setattr(doctor_module, "time_attention", lambda shape, dtype, timer, segments=1: 1e-4)
    monkeypatch.setattr(doctor_module, "time_op", lambda call, timer: 1e-6)
    monkeypatch.setattr(doctor_module, "time_optimizer", lambda shapes, timer: (1e-4, 1))
    monkeypatch.setattr(doctor_module, "copy_bandwidth", lambda timer: 1e10)
    monkeypatch.setattr(doctor_module, "tiny_kernel_seconds", lambda timer: 1e-6)


@pytest.mark.slow  # two doctor runs
def test_padding_is_advised_only_when_its_saving_exceeds_the_spread(capsys, config_path, monkeypatch):
    argv = ["doctor", "--config", str(config_path), "--batch-size", str(ROWS), "--seq-len", str(LENGTH)]
    argv += ["--repeats", "1", "--rounds", "3"]
    noisy_machine(monkeypatch, slow_round=3.0)  # one round three times slower: spread 2 ms, saving 0.1 ms
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "saves" not in out
    assert "lm_head fwd): no advice, its saving" in out and "within the noise" in out
    noisy_machine(monkeypatch, slow_round=1.0)  # a steady machine: the same saving is advised
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lm_head fwd) to 48x64x1008 saves" in out and "no advice" not in out


def test_a_padding_gain_must_hold_in_every_round_and_beat_the_spread():
    from mfu_callbacks.doctor import TimedMatmul
    from mfu_callbacks.doctor.step_trace import MatmulShape

    shape = MatmulShape(batch=1, m=48, k=64, n=1001)

    def gain(original, padded):
        return TimedMatmul(shape, 2, original, "lm_head fwd", {"48x64x1008": padded}).padding_gain

    # Steady rounds: saves 0.1 ms a call, 0.2 ms a step (two calls).
    assert gain((1.0e-3, 1.01e-3, 1.0e-3), (0.9e-3, 0.9e-3, 0.91e-3)) == ("48x64x1008", pytest.approx(2e-4))
    # One slow round: the spread (2 ms a call) dwarfs the saving.
    assert gain((1.0e-3, 3.0e-3, 1.0e-3), (0.9e-3, 2.9e-3, 0.9e-3)) is None
    # Faster in the median but slower in one round: not advised.
    assert gain((1.0e-3, 1.0e-3, 1.0e-3), (0.5e-3, 1.2e-3, 0.5e-3)) is None
    # One round: no spread to beat, the 3% floor alone.
    assert gain((1.0e-3,), (0.9e-3,)) is not None and gain((1.0e-3,), (0.99e-3,)) is None
