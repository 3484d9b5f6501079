"""Reward model on the SFT backbone: the score is read at EOS, it learns preferences, it resumes."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from tasks.align.config import RewardOptions
from tasks.align.reward import (
    build_reward_trainer,
    pairwise_accuracy,
    read_preferences,
    reward_input_ids,
    reward_scores,
    train_reward_model,
)
from tasks.align.sft import AlignError


def test_the_score_is_read_at_the_eos_token(sft_model_dir, unwanted_preferences, tmp_path):
    """PPO reads the reward where training read it: at the EOS ending prompt + response, under padding."""
    tokenizer = AutoTokenizer.from_pretrained(sft_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(sft_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    table = read_preferences(unwanted_preferences["train"])

    # Our ids are exactly the ones RewardTrainer trains on, and they end with EOS.
    trainer = build_reward_trainer(model, tokenizer, table, RewardOptions(max_steps=1), tmp_path / "ck")
    for example, row in zip(trainer.train_dataset, table.to_pylist()):
        assert example["chosen_ids"] == reward_input_ids(tokenizer, row["prompt"], row["chosen"])
        assert example["rejected_ids"] == reward_input_ids(tokenizer, row["prompt"], row["rejected"])
        assert example["chosen_ids"][-1] == tokenizer.eos_token_id

    # In a right-padded batch, the pooled score equals the head applied at each row's EOS position.
    prompts, responses = ["Say hello to Anna.", "Count from 1 to 9."], ["Hi", "1, 2, 3, 4, 5, 6, 7, 8, 9"]
    rows = [reward_input_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    input_ids = torch.full((2, width), tokenizer.pad_token_id)
    attention = torch.zeros((2, width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)], attention[i, : len(ids)] = torch.tensor(ids), 1
    model.eval()
    with torch.no_grad():
        per_token = model.score(model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state)[..., 0]
    at_eos = [float(per_token[i, len(ids) - 1]) for i, ids in enumerate(rows)]
    assert all(input_ids[i, len(ids) - 1] == tokenizer.eos_token_id for i, ids in enumerate(rows))
    assert reward_scores(model, tokenizer, prompts, responses) == pytest.approx(at_eos, abs=1e-5)
    # Batching does not change a score (the short row is padded in the batch, alone it is not).
    alone = [reward_scores(model, tokenizer, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert alone == pytest.approx(at_eos, abs=1e-5)


@pytest.mark.slow
def test_reward_model_learns_to_penalise_an_unwanted_addition(sft_model_dir, unwanted_preferences, tmp_path):
    lines: list[str] = []
    options = RewardOptions(max_steps=60, learning_rate=5e-4, eval_steps=30, logging_steps=10, seed=0)
    metrics = train_reward_model(
        sft_model_dir, unwanted_preferences["train"], unwanted_preferences["eval"], tmp_path / "rm", options,
        tmp_path / "ck", log=lines.append,
    )
    print("RM (unwanted addition):", {k: v for k, v in metrics.items() if not isinstance(v, list)})
    assert metrics["steps"] == 60
    assert metrics["accuracy_after"] >= 0.8
    assert metrics["accuracy_after"] > metrics["accuracy_before"]
    assert any(line.startswith("reward step 60/60") for line in lines)
    # The saved model scores the held-out pairs the same way (the evaluation reloads it from disk).
    held_out = pq.read_table(unwanted_preferences["eval"])
    assert pairwise_accuracy(tmp_path / "rm", None, held_out) == pytest.approx(metrics["accuracy_after"])
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert saved.config.pad_token_id == AutoTokenizer.from_pretrained(tmp_path / "rm").pad_token_id
    assert saved.config.num_labels == 1


class CrashAt(TrainerCallback):
    """Simulates a crash right after optimizer step `at` (the SFT test covers a real SIGKILL)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"crash at {self.at}")


def test_reward_training_resumes_from_its_checkpoint(sft_model_dir, unwanted_preferences, tmp_path):
    options = RewardOptions(max_steps=8, eval_steps=4, logging_steps=2, seed=0)
    args = (sft_model_dir, unwanted_preferences["train"], unwanted_preferences["eval"], tmp_path / "rm", options, tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(*args, log=lambda s: None, callbacks=[CrashAt(6)])
    assert not (tmp_path / "rm").exists()
    lines: list[str] = []
    metrics = train_reward_model(*args, log=lines.append)
    assert metrics["resumed_from"] == "checkpoint-4"
    assert metrics["steps"] == 8
    assert [step for step, _ in metrics["train_loss"]] == [2, 4, 6, 8]
    assert not any(line.startswith("reward step 2/8: loss") for line in lines)


def test_reward_stage_refuses_bad_input_before_training(sft_model_dir, unwanted_preferences, tmp_path):
    import pyarrow as pa

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "good": ["a"], "bad": ["b"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet: field 'chosen': missing column \(also missing: rejected; columns present: prompt, good, bad\)$"):
        train_reward_model(sft_model_dir, bad, unwanted_preferences["eval"], tmp_path / "rm", RewardOptions(), tmp_path / "ck")

    eos_pad = tmp_path / "eos-pad"
    shutil.copytree(sft_model_dir, eos_pad)
    tokenizer = AutoTokenizer.from_pretrained(eos_pad)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(eos_pad)
    with pytest.raises(AlignError, match="pads with its EOS token"):
        train_reward_model(eos_pad, unwanted_preferences["train"], unwanted_preferences["eval"], tmp_path / "rm",
                           RewardOptions(), tmp_path / "ck2")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck2").exists()
