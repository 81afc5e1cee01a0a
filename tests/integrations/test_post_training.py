"""Post-training steps (TRL 1.16's trainers) log the model FLOPs of every forward in the optimizer step:
with grad, forward and backward; without grad (a reference model, adapters disabled, KTO's KL pass),
the forward once. Checked against torch's ``FlopCounterMode`` replaying each step's forwards
(``trl_steps.py``), at two sequence lengths, with training bit-identical with and without the callback.
All in the slow tier: a TRL trainer's set-up alone takes seconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mfu_callbacks.transformers import MFUCallback
from tests.helpers.trl_steps import (
    StepTruth,
    logged_step_flops,
    preference_rows,
    tiny_llama,
    tokenizer,
    unpaired_rows,
    weights,
)

pytest.importorskip("trl")

STEPS = 4
LENGTHS = [(4, 6), (6, 13)]  # (prompt words, completion words): every sequence of a run the same length


def lora_config(task: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=task)


def _common(tmp_path, **arguments: Any) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_checkpointing=False, bf16=False, seed=0,
        learning_rate=1e-3, **arguments,
    )  # fmt: skip


def dpo(tmp_path, lengths, callbacks, *, reference: str = "model", lora: bool = False, **arguments: Any):
    """``reference``: "model" (a separate unfrozen model), "path" (the policy given as a saved model's
    path: the trainer builds the reference from it), "none" (the policy: adapters disabled under LoRA)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model: Any = tiny_llama()
    ref_model = tiny_llama(seed=1) if reference == "model" else None
    if reference == "path":  # the trainer loads the policy from it, and the reference from the same path
        path = tmp_path / "saved"
        if not path.exists():
            model.save_pretrained(path)
        model = str(path)
        arguments["model_init_kwargs"] = {"attn_implementation": "eager"}
    return DPOTrainer(
        model=model, ref_model=ref_model, args=DPOConfig(**_common(tmp_path / "run", **arguments)),
        train_dataset=Dataset.from_list(preference_rows(32, *lengths)), processing_class=tokenizer(),
        callbacks=callbacks, peft_config=lora_config() if lora else None,
        **({"eval_dataset": Dataset.from_list(preference_rows(4, *lengths, seed=1))} if "eval_steps" in arguments else {}),
    )  # fmt: skip


def kto(tmp_path, lengths, callbacks, *, lora: bool = False):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer(
        model=tiny_llama(), ref_model=None if lora else tiny_llama(seed=1),
        args=KTOConfig(**_common(tmp_path / "run")), train_dataset=Dataset.from_list(unpaired_rows(32, *lengths)),
        processing_class=tokenizer(), callbacks=callbacks, peft_config=lora_config() if lora else None,
    )  # fmt: skip


def orpo(tmp_path, lengths, callbacks):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(
        model=tiny_llama(), args=ORPOConfig(**_common(tmp_path / "run")),
        train_dataset=Dataset.from_list(preference_rows(32, *lengths)), processing_class=tokenizer(),
        callbacks=callbacks,
    )  # fmt: skip


def reward(tmp_path, lengths, callbacks, *, lora: bool = False):
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    config = tiny_llama().config
    config.num_labels, config.pad_token_id = 1, 0
    model = LlamaForSequenceClassification(config)
    return RewardTrainer(
        model=model, args=RewardConfig(**_common(tmp_path / "run")),
        train_dataset=Dataset.from_list(preference_rows(32, *lengths)), processing_class=tokenizer(),
        callbacks=callbacks, peft_config=lora_config("SEQ_CLS") if lora else None,
    )  # fmt: skip


CASES = {
    "dpo_full_separate_reference": lambda tmp, lengths, cbs: dpo(tmp, lengths, cbs),
    "dpo_reference_from_a_path": lambda tmp, lengths, cbs: dpo(tmp, lengths, cbs, reference="path"),
    "dpo_lora": lambda tmp, lengths, cbs: dpo(tmp, lengths, cbs, reference="none", lora=True),
    "dpo_precomputed_reference": lambda tmp, lengths, cbs: dpo(
        tmp, lengths, cbs, precompute_ref_log_probs=True
    ),
    "dpo_accumulation_and_eval": lambda tmp, lengths, cbs: dpo(
        tmp, lengths, cbs, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2
    ),
    "kto_full": lambda tmp, lengths, cbs: kto(tmp, lengths, cbs),
    "kto_lora": lambda tmp, lengths, cbs: kto(tmp, lengths, cbs, lora=True),
    "orpo": orpo,
    "reward_full": lambda tmp, lengths, cbs: reward(tmp, lengths, cbs),
    "reward_lora": lambda tmp, lengths, cbs: reward(tmp, lengths, cbs, lora=True),
}


def run_with_truth(case: str, tmp_path, lengths) -> tuple[Any, StepTruth, list[float]]:
    callback = MFUCallback(peak_tflops=1.0, warmup_steps=1)
    trainer = CASES[case](tmp_path, lengths, [callback])
    truth = StepTruth(trainer.model, getattr(trainer, "ref_model", None))
    trainer.add_callback(truth)
    trainer.train()
    truth.remove()
    return trainer, truth, [row["loss"] for row in trainer.state.log_history if "loss" in row]


def assert_matches_truth(trainer, truth: StepTruth) -> None:
    logged = logged_step_flops(trainer.state.log_history)
    assert len(logged) >= STEPS - 2, trainer.state.log_history  # all but warm-up and the engine's build
    truths = truth.step_flops()
    assert len(truths) == STEPS
    for step, flops in logged:
        assert flops == pytest.approx(truths[step - 1], rel=0.01), (step, flops / truths[step - 1])


def assert_training_unchanged(case: str, tmp_path, trainer, losses: list[float]) -> None:
    plain = CASES[case](tmp_path / "plain", LENGTHS[0], [])
    plain.train()
    assert [row["loss"] for row in plain.state.log_history if "loss" in row] == losses
    ours, theirs = weights(trainer.model), weights(plain.model)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda lengths: f"{lengths[0]}+{lengths[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_each_step_logs_the_model_flops_of_every_forward(tmp_path, case: str, lengths) -> None:
    trainer, truth, losses = run_with_truth(case, tmp_path, lengths)
    assert_matches_truth(trainer, truth)
    if lengths == LENGTHS[0]:
        assert_training_unchanged(case, tmp_path, trainer, losses)
