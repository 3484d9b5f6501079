"""Supervised fine-tuning (SFT) with TRL's SFTTrainer, resumable, with held-out loss before and after.

The data is conversational prompt-completion (see `tasks.align.data`): TRL renders it with the
model's chat template, so every target ends with the template's EOS and the loss covers the answer
only. The same helpers (`check_tokenizer`, `StreamLogs`, `StopOnNonFinite`, `trainer_arguments`,
`train_from_latest_checkpoint`) serve the reward-model stage.

    metrics = train_sft(base_dir, train.parquet, eval.parquet, out_dir, SFTOptions(), ckpt_dir, log=logger.info)

Calling it again with the same checkpoint_dir resumes from the newest complete checkpoint there.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from transformers import TrainerCallback

from storage.errors import AlignflowError
from tasks.align.config import RewardOptions, SFTOptions
from tasks.align.data import load_sft_table, normalize_sft_table, to_prompt_completion_dataset
from tasks.align.devices import torch_device, training_device_kwargs
from tasks.align.stats import ratio_difference

Log = Callable[[str], None]
OPTIONS_FILE = "alignflow_options.json"


class AlignError(AlignflowError, ValueError):
    """Bad input for an align stage, found before any training starts."""


class NonFiniteLossError(AlignflowError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; names the stage and the step."""

    def __init__(self, stage: str, step: int, what: str):
        super().__init__(
            f"{stage}: {what} at step {step}; training stopped. Lower the learning rate or check the data."
        )
        self.stage, self.step = stage, step


# ---------------------------------------------------------------- shared checks and callbacks


def check_tokenizer(tokenizer, source: str | Path, stage: str) -> None:
    """Refuse a tokenizer that cannot produce EOS-terminated chat targets; called before any training.

    The reward model and PPO read the score at the last token, which must be the EOS the template
    puts after the answer, and PPO's query must be a prefix of query + response.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise AlignError(f"{stage}: the tokenizer in {source} has no chat template; the align stage needs one")
    if tokenizer.eos_token_id is None:
        raise AlignError(f"{stage}: the tokenizer in {source} has no EOS token; targets could never end")
    prompt = [{"role": "user", "content": "Say yes."}]
    full = prompt + [{"role": "assistant", "content": "yes"}]
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    if not full_ids or full_ids[-1] != tokenizer.eos_token_id:
        tail = tokenizer.decode(full_ids[-3:]) if full_ids else ""
        raise AlignError(
            f"{stage}: the chat template in {source} does not end the assistant turn with EOS "
            f"({tokenizer.eos_token!r}); it ends with {tail!r}"
        )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise AlignError(
            f"{stage}: in {source}, the chat template's generation prompt is not a prefix of the rendered "
            "conversation; completions would be scored at the wrong tokens"
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class StreamLogs(TrainerCallback):
    """Send each Trainer log line (loss, lr, eval metrics) to `log`, e.g. a Prefect run logger."""

    def __init__(self, stage: str, log: Log):
        self.stage, self.log = stage, log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            fields = " ".join(f"{k}={_fmt(v)}" for k, v in logs.items())
            self.log(f"{self.stage} step {state.global_step}/{state.max_steps}: {fields}")


class StopOnNonFinite(TrainerCallback):
    """Stop with `NonFiniteLossError` as soon as a gradient or a logged loss is NaN/inf.

    Gradients are checked every step (before the optimizer applies them, so the weights stay
    finite); the logged loss is checked too, since Trainer would otherwise average NaN away.
    """

    def __init__(self, stage: str):
        self.stage = stage

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise NonFiniteLossError(self.stage, state.global_step + 1, "non-finite gradient (NaN/inf loss)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLossError(self.stage, state.global_step, f"{key} is {value}")


def quiet_progress_bars() -> None:
    """Turn off datasets' and transformers' progress bars: they flood a flow run's log with \r lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def drop_printer(trainer) -> None:
    """With tqdm off, Trainer prints every log dict to stdout; StreamLogs already sends them to `log`."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` folder, or None.

    Trainer writes `trainer_state.json` last, so a folder without a readable one was cut off by a
    kill mid-save and is skipped.
    """
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for folder in checkpoint_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if not match or not folder.is_dir():
            continue
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((int(match.group(1)), folder))
    return max(found)[1] if found else None


def guard_checkpoint_dir(checkpoint_dir: Path, stage: str, options: Any) -> None:
    """Refuse to resume checkpoints written with other options (their schedule and data would not match)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record = checkpoint_dir / OPTIONS_FILE
    current = {"stage": stage, "options": options.model_dump(mode="json")}
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != current:
            raise AlignError(
                f"{stage}: {checkpoint_dir} holds checkpoints of a run with other options; "
                "use another checkpoint folder or delete it"
            )
    else:
        record.write_text(json.dumps(current, indent=2))


def train_from_latest_checkpoint(trainer, checkpoint_dir: Path, lora_enabled: bool, stage: str, log: Log):
    """Train, resuming from the newest complete checkpoint; return (result, the checkpoint resumed
    from or None, the trained model with LoRA adapters merged into its weights)."""
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        log(f"{stage}: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    model = trainer.model.merge_and_unload() if lora_enabled else trainer.model
    return result, resume, model


def shared_trainer_arguments(options: Any, checkpoint_dir: Path) -> dict[str, Any]:
    """The TrainingArguments every align trainer shares (batches, schedule, checkpoints, seeds, device).

    `max_length` is passed only when the options have one (RLOO's config has no such field).
    """
    return dict(
        output_dir=str(checkpoint_dir),
        learning_rate=options.learning_rate,
        per_device_train_batch_size=options.per_device_train_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        **({"max_length": options.max_length} if hasattr(options, "max_length") else {}),
        warmup_steps=options.warmup_steps,
        logging_steps=options.logging_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        data_seed=options.seed,
        # Trainer replaces NaN losses by the running mean in its logs unless told not to.
        logging_nan_inf_filter=False,
        **training_device_kwargs(),
    )


def trainer_arguments(options: SFTOptions | RewardOptions, checkpoint_dir: Path, best_metric: str,
                      greater_is_better: bool, validation: bool = True) -> dict[str, Any]:
    """SFT and the reward model: epochs, validation every epoch (or every `eval_steps`), the best restored.

    They checkpoint at each evaluation, and restore the checkpoint with the best `best_metric` at
    the end. Checkpoints and evaluations coincide because the best one must be on disk to be restored.
    Without `validation` data they checkpoint on the same schedule and keep the last weights.
    """
    strategy = "steps" if options.eval_steps else "epoch"
    if not validation:
        return dict(**shared_trainer_arguments(options, checkpoint_dir), num_train_epochs=options.num_train_epochs,
                    max_steps=options.max_steps or -1, eval_strategy="no", save_strategy=strategy,
                    save_steps=options.eval_steps)
    return dict(
        **shared_trainer_arguments(options, checkpoint_dir),
        num_train_epochs=options.num_train_epochs,
        max_steps=options.max_steps or -1,
        per_device_eval_batch_size=options.per_device_train_batch_size,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=options.eval_steps,
        save_steps=options.eval_steps,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=greater_is_better,
    )


def step_trainer_arguments(options: Any, checkpoint_dir: Path) -> dict[str, Any]:
    """DPO and RLOO: a fixed number of steps, a resumable checkpoint every `save_steps`."""
    return dict(**shared_trainer_arguments(options, checkpoint_dir), max_steps=options.max_steps,
                save_strategy="steps", save_steps=options.save_steps)


def early_stopping(options: SFTOptions | RewardOptions) -> list[TrainerCallback]:
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(options.early_stopping_patience)] if options.early_stopping_patience else []


def best_checkpoint_summary(trainer) -> dict[str, Any]:
    """Which checkpoint was restored, and its validation metric (for logs, manifests and gates)."""
    state = trainer.state
    best = state.best_model_checkpoint
    return {"best_checkpoint": Path(best).name if best else None, "best_validation_metric": state.best_metric,
            "epochs_trained": float(state.epoch or 0.0)}


def loss_curve(log_history: list[dict], key: str = "loss") -> list[list[float]]:
    """[[step, value], ...] from Trainer's log history (JSON-friendly, for plots and manifests)."""
    return [[entry["step"], float(entry[key])] for entry in log_history if key in entry and "step" in entry]


# ---------------------------------------------------------------- held-out loss


def encode_prompt_completion(tokenizer, prompt_messages: list[dict], completion: str) -> tuple[list[int], int]:
    """Token ids of prompt + completion as SFTTrainer builds them, and the number of prompt tokens."""
    prompt_ids = tokenizer.apply_chat_template(
        prompt_messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    full_ids = tokenizer.apply_chat_template(
        prompt_messages + [{"role": "assistant", "content": completion}], tokenize=True, return_dict=True
    )["input_ids"]
    return list(full_ids), len(prompt_ids)


def completion_nll(model, tokenizer, table: pa.Table, max_length: int = 512, batch_size: int = 16) -> float:
    """Mean negative log-likelihood per completion token (answer + EOS) over `table`, in nats.

    The same function measures the model before and after training, and the evaluation reuses it
    for perplexity (exp of this).
    """
    sums, counts = completion_nll_rows(model, tokenizer, table, max_length, batch_size)
    if counts.sum() == 0:
        raise AlignError("no completion tokens to score (all completions truncated away?)")
    return float(sums.sum() / counts.sum())


def completion_nll_rows(model, tokenizer, table: pa.Table, max_length: int = 512, batch_size: int = 16):
    """Per example: the summed NLL of its completion tokens and their number (numpy arrays).

    Kept per example so that a difference between two models gets a standard error over examples.
    """
    import numpy as np
    import torch

    if "prompt_messages" not in table.column_names:
        table = normalize_sft_table(table)
    rows = [
        encode_prompt_completion(tokenizer, messages, completion)
        for messages, completion in zip(table.column("prompt_messages").to_pylist(), table.column("completion").to_pylist())
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = [(ids[:max_length], n_prompt) for ids, n_prompt in rows[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (ids, n_prompt) in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
                labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
            input_ids, attention, labels = input_ids.to(device), attention.to(device), labels.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            # Position t predicts token t+1.
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
            )
            sums[start : start + len(chunk)] = losses.sum(1).double().cpu().numpy()
            counts[start : start + len(chunk)] = (shift_labels != -100).sum(1).cpu().numpy()
    model.train(was_training)
    return sums, counts


# ---------------------------------------------------------------- training


def load_tokenizer(model_dir: Path, stage: str):
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise AlignError(f"{stage}: model folder {model_dir} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    check_tokenizer(tokenizer, model_dir, stage)
    return tokenizer


def build_sft_trainer(
    model,
    tokenizer,
    train_table: pa.Table,
    eval_table: pa.Table | None,
    options: SFTOptions,
    checkpoint_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
):
    """The configured SFTTrainer (exposed so tests can inspect the exact tokens it trains on)."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **trainer_arguments(options, checkpoint_dir, "eval_loss", greater_is_better=False, validation=eval_table is not None),
        weight_decay=options.weight_decay,
        completion_only_loss=options.completion_only_loss,
    )
    quiet_progress_bars()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=to_prompt_completion_dataset(train_table),
        eval_dataset=to_prompt_completion_dataset(eval_table) if eval_table is not None else None,
        processing_class=tokenizer,
        peft_config=options.lora.peft_config("CAUSAL_LM"),
        callbacks=[*(early_stopping(options) if eval_table is not None else []), *(callbacks or [])],
    )
    drop_printer(trainer)
    return trainer


def train_sft(
    model_dir: Path,
    train_path: Path,
    eval_path: Path,
    output_dir: Path,
    options: SFTOptions,
    checkpoint_dir: Path,
    log: Log = print,
    callbacks: list[TrainerCallback] | None = None,
    test_path: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune the causal LM in `model_dir` on (prompt, completion) data; save it to `output_dir`.

    Trains by epochs with early stopping on the validation examples in `eval_path` and restores the
    best checkpoint. Returns eval_loss_before/after (validation completion NLL per token), steps, the
    train_loss curve [[step, loss], ...], the restored checkpoint, and where it resumed from. With
    `test_path`, also the test NLL of the base and of the result with the standard error of their
    difference (test_nll_base, test_nll_sft, test_nll_diff, test_nll_diff_se). `callbacks` are extra
    TrainerCallbacks (tests use one to inject a fault).
    """
    from transformers import AutoModelForCausalLM, set_seed

    model_dir, output_dir, checkpoint_dir = Path(model_dir), Path(output_dir), Path(checkpoint_dir)
    tokenizer = load_tokenizer(model_dir, "sft")
    train_table, eval_table = load_sft_table(train_path), load_sft_table(eval_path)
    guard_checkpoint_dir(checkpoint_dir, "sft", options)

    set_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(torch_device())
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise AlignError(f"sft: the model in {model_dir} has fewer embeddings than its tokenizer has tokens")
    eval_loss_before = completion_nll(model, tokenizer, eval_table, options.max_length)
    test_table = load_sft_table(test_path) if test_path else None
    test_before = completion_nll_rows(model, tokenizer, test_table, options.max_length) if test_table is not None else None
    log(f"sft: {train_table.num_rows} train / {eval_table.num_rows} validation"
        + (f" / {test_table.num_rows} test" if test_table is not None else "")
        + f" examples; validation completion NLL before: {eval_loss_before:.4f}")

    trainer = build_sft_trainer(
        model, tokenizer, train_table, eval_table, options, checkpoint_dir,
        callbacks=[StreamLogs("sft", log), StopOnNonFinite("sft"), *(callbacks or [])],
    )
    result, resume, model = train_from_latest_checkpoint(trainer, checkpoint_dir, options.lora.enabled, "sft", log)
    eval_loss_after = completion_nll(model, tokenizer, eval_table, options.max_length)
    best = best_checkpoint_summary(trainer)
    log(f"sft: restored {best['best_checkpoint']} after {best['epochs_trained']:.1f} epochs; validation completion NLL "
        f"{eval_loss_before:.4f} -> {eval_loss_after:.4f}")
    test = {}
    if test_before is not None:
        test_after = completion_nll_rows(model, tokenizer, test_table, options.max_length)
        diff, se = ratio_difference(test_after[0], test_before[0], test_before[1])
        test = {"test_nll_base": float(test_before[0].sum() / test_before[1].sum()),
                "test_nll_sft": float(test_after[0].sum() / test_after[1].sum()), "test_nll_diff": diff,
                "test_nll_diff_se": se, "test_examples": test_table.num_rows}
        log(f"sft: test completion NLL {test['test_nll_base']:.4f} (base) -> {test['test_nll_sft']:.4f} "
            f"(difference {diff:+.4f} ± {se:.4f})")

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    history = trainer.state.log_history
    return {
        "eval_loss_before": eval_loss_before,
        "eval_loss_after": eval_loss_after,
        "steps": trainer.state.global_step,
        "train_loss": loss_curve(history, "loss"),
        "eval_loss_curve": loss_curve(history, "eval_loss"),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "train_tokens": int(next((e["num_tokens"] for e in reversed(history) if "num_tokens" in e), 0)),
        "train_examples": train_table.num_rows,
        "eval_examples": eval_table.num_rows,
        "resumed_from": resume.name if resume else None,
        **best,
        **test,
    }
