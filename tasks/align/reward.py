"""Reward model: a scalar head on the SFT backbone, trained with TRL's RewardTrainer on preference pairs.

What the reward model reads is exactly what PPO will show it: the chat template applied to
(user prompt, assistant response), which ends with the template's EOS, right-padded with the pad
token. LlamaForSequenceClassification scores the last non-pad token, so the score is read at that
EOS. `reward_input_ids` builds those ids; `reward_scores` and `pairwise_accuracy` use them, and the
tests check that they equal the ids RewardTrainer trains on.

    metrics = train_reward_model(sft_dir, train_prefs.parquet, eval_prefs.parquet, out_dir,
                                 RewardOptions(), ckpt_dir, log=logger.info)
    accuracy = pairwise_accuracy(out_dir, None, held_out_prefs_table)

Calling it again with the same checkpoint_dir resumes from the newest complete checkpoint there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
from transformers import TrainerCallback

from tasks.align.config import RewardOptions
from tasks.align.devices import torch_device
from tasks.align.preferences import load_preference_file
from tasks.align.stats import proportion_se
from tasks.align.sft import (
    AlignError,
    StopOnNonFinite,
    best_checkpoint_summary,
    early_stopping,
    StreamLogs,
    drop_printer,
    guard_checkpoint_dir,
    load_tokenizer,
    loss_curve,
    quiet_progress_bars,
    train_from_latest_checkpoint,
    trainer_arguments,
)

Log = Callable[[str], None]


def check_reward_tokenizer(tokenizer, source: str | Path) -> None:
    """The score is read at the last non-pad token: a pad token equal to EOS would hide the EOS."""
    if tokenizer.pad_token_id is None:
        raise AlignError(f"reward: the tokenizer in {source} has no pad token; the reward model needs one")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise AlignError(
            f"reward: the tokenizer in {source} pads with its EOS token; the score would be read before the "
            "EOS instead of at it. Give the tokenizer a separate pad token."
        )


def reward_input_ids(tokenizer, prompt: str | list[dict], response: str) -> list[int]:
    """Token ids the reward model scores: chat template of (prompt, response), ending with EOS."""
    context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return list(
        tokenizer.apply_chat_template(
            context + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True
        )["input_ids"]
    )


def preference_dataset(table: pa.Table):
    """TRL's conversational preference format with an explicit prompt (RewardTrainer renders the template)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in table.column("prompt").to_pylist()],
            "chosen": [[{"role": "assistant", "content": c}] for c in table.column("chosen").to_pylist()],
            "rejected": [[{"role": "assistant", "content": r}] for r in table.column("rejected").to_pylist()],
        }
    )


def load_reward_model(model_dir: str | Path):
    """(model, tokenizer) of a saved reward model, in eval mode on the default device."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(torch_device()).eval()
    return model, tokenizer


def reward_scores(
    model, tokenizer, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 16
) -> list[float]:
    """The reward model's score for each (prompt, response), read at the response's EOS."""
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = [
                reward_input_ids(tokenizer, p, r)
                for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
            ]
            width = max(len(ids) for ids in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, ids in enumerate(rows):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            scores.extend(float(v) for v in logits[:, 0].float().cpu())
    model.train(was_training)
    return scores


def pairwise_accuracy(model_dir_or_model, tokenizer, prefs_table: pa.Table, batch_size: int = 16) -> float:
    """Fraction of pairs where the reward model scores `chosen` above `rejected` (a tie counts 1/2).

    `model_dir_or_model`: a saved reward model folder (then `tokenizer` may be None) or a model.
    """
    if isinstance(model_dir_or_model, (str, Path)):
        model, saved_tokenizer = load_reward_model(model_dir_or_model)
        tokenizer = tokenizer or saved_tokenizer
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise ValueError("pairwise_accuracy: pass the tokenizer along with a model object")
    if prefs_table.num_rows == 0:
        raise AlignError("pairwise accuracy of an empty preference table")
    prompts = prefs_table.column("prompt").to_pylist()
    chosen = reward_scores(model, tokenizer, prompts, prefs_table.column("chosen").to_pylist(), batch_size)
    rejected = reward_scores(model, tokenizer, prompts, prefs_table.column("rejected").to_pylist(), batch_size)
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return wins / len(chosen)


def build_reward_trainer(
    model, tokenizer, train_table: pa.Table, options: RewardOptions, checkpoint_dir: Path,
    callbacks: list[TrainerCallback] | None = None, validation_table: pa.Table | None = None,
):
    """The configured RewardTrainer (exposed so tests can inspect the exact tokens it trains on).

    With `validation_table`, it evaluates pairwise accuracy on it every epoch, stops early and
    restores the most accurate checkpoint; without, it trains every epoch and keeps the last.
    """
    from trl import RewardConfig, RewardTrainer

    arguments = trainer_arguments(options, checkpoint_dir, "eval_accuracy", greater_is_better=True,
                                  validation=validation_table is not None)
    config = RewardConfig(**arguments, center_rewards_coefficient=options.center_rewards_coefficient)
    quiet_progress_bars()
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=preference_dataset(train_table),
        eval_dataset=preference_dataset(validation_table) if validation_table is not None else None,
        processing_class=tokenizer,
        peft_config=options.lora.peft_config("SEQ_CLS"),
        callbacks=[*(early_stopping(options) if validation_table is not None else []), *(callbacks or [])],
    )
    drop_printer(trainer)
    return trainer


def read_preferences(path: str | Path) -> pa.Table:
    """A preference Parquet file, validated (columns, empty texts), keeping its judge column."""
    return load_preference_file(path, judge=None)


def train_reward_model(
    model_dir: Path,
    train_prefs: Path,
    eval_prefs: Path,
    output_dir: Path,
    options: RewardOptions,
    checkpoint_dir: Path,
    log: Log = print,
    callbacks: list[TrainerCallback] | None = None,
    test_prefs: Path | None = None,
) -> dict[str, Any]:
    """Train a reward model on the SFT backbone in `model_dir`; save model + tokenizer to `output_dir`.

    Early stopping and the restored checkpoint are chosen on the validation pairs in `eval_prefs`.
    Returns validation pairwise accuracy before (random head) and after training, steps, the loss
    and accuracy curves [[step, value], ...], and where it resumed from; with `test_prefs`, also the
    test accuracy and its standard error (test_accuracy, test_accuracy_se, test_pairs).
    """
    from transformers import AutoModelForSequenceClassification, set_seed

    model_dir, output_dir, checkpoint_dir = Path(model_dir), Path(output_dir), Path(checkpoint_dir)
    tokenizer = load_tokenizer(model_dir, "reward")
    check_reward_tokenizer(tokenizer, model_dir)
    train_table, eval_table = read_preferences(train_prefs), read_preferences(eval_prefs)
    guard_checkpoint_dir(checkpoint_dir, "reward", options)

    # The new score head is initialised from the seed.
    set_seed(options.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(torch_device())
    accuracy_before = pairwise_accuracy(model, tokenizer, eval_table)
    log(f"reward: {train_table.num_rows} train / {eval_table.num_rows} held-out pairs; "
        f"held-out pairwise accuracy before: {accuracy_before:.3f}")

    trainer = build_reward_trainer(
        model, tokenizer, train_table, options, checkpoint_dir,
        callbacks=[StreamLogs("reward", log), StopOnNonFinite("reward"), *(callbacks or [])], validation_table=eval_table,
    )
    dropped = train_table.num_rows - len(trainer.train_dataset)
    if dropped:
        log(f"reward: {dropped} pairs longer than max_length={options.max_length} tokens were dropped")
    if len(trainer.train_dataset) == 0:
        raise AlignError(f"reward: every training pair is longer than max_length={options.max_length} tokens")
    result, resume, model = train_from_latest_checkpoint(trainer, checkpoint_dir, options.lora.enabled, "reward", log)
    model.config.pad_token_id = tokenizer.pad_token_id
    accuracy_after = pairwise_accuracy(model, tokenizer, eval_table)
    best = best_checkpoint_summary(trainer)
    log(f"reward: restored {best['best_checkpoint']} after {best['epochs_trained']:.1f} epochs; validation pairwise "
        f"accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}")
    test = {}
    if test_prefs is not None:
        test_table = read_preferences(test_prefs)
        accuracy = pairwise_accuracy(model, tokenizer, test_table)
        test = {"test_accuracy": accuracy, "test_accuracy_se": proportion_se(accuracy * test_table.num_rows, test_table.num_rows),
                "test_pairs": test_table.num_rows}
        log(f"reward: test pairwise accuracy {accuracy:.3f} ± {test['test_accuracy_se']:.3f} on {test_table.num_rows} pairs")

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    history = trainer.state.log_history
    return {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "steps": trainer.state.global_step,
        "train_loss": loss_curve(history, "loss"),
        "train_accuracy": loss_curve(history, "accuracy"),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "train_pairs": len(trainer.train_dataset),
        "dropped_too_long": dropped,
        "eval_pairs": eval_table.num_rows,
        "resumed_from": resume.name if resume else None,
        **best,
        **test,
    }
