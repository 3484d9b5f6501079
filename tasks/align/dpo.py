"""DPO: the SFT policy learns straight from preference pairs, with a frozen SFT copy as the reference.

An alternative to reward model + PPO: TRL's `DPOTrainer` (stable API) on the same preference
Parquet files the reward stage reads (`prompt, chosen, rejected`), in the conversational format
(`tasks.align.reward.preference_dataset`), so each answer is the chat template's assistant turn
ending with EOS, exactly as SFT trained it. No reward model is needed: the policy's implicit reward
is beta * (log p_policy(answer) - log p_reference(answer)).

    metrics = train_dpo(sft_dir, train_prefs.parquet, heldout_prefs.parquet, out_dir, DPOOptions(), ckpt_dir,
                        log=logger.info)

On held-out pairs it measures, before and after training: the implicit reward's preference
accuracy (0.5 before: policy and reference are the same model, every margin is 0), the mean
implicit margin, and the completion NLL of the chosen and the rejected answers.

Calling it again with the same checkpoint_dir resumes from the newest complete checkpoint there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import pyarrow as pa
from pydantic import BaseModel, Field
from transformers import TrainerCallback

from tasks.align.config import LoraOptions
from tasks.align.devices import torch_device
from tasks.align.reward import preference_dataset, read_preferences
from tasks.align.sft import (
    AlignError,
    StopOnNonFinite,
    StreamLogs,
    completion_nll,
    drop_printer,
    encode_prompt_completion,
    guard_checkpoint_dir,
    load_tokenizer,
    loss_curve,
    quiet_progress_bars,
    step_trainer_arguments,
    train_from_latest_checkpoint,
)

Log = Callable[[str], None]
STAGE = "dpo"

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"]


class DPOOptions(BaseModel):
    """Direct preference optimization with TRL's DPOTrainer: preference pairs, a frozen SFT reference, no RM."""

    max_steps: int = Field(60, ge=1, description="Total number of optimizer steps.")
    learning_rate: float = Field(
        2e-4, gt=0.0, description="Peak learning rate of AdamW (linear decay). 2e-4 suits the project's tiny models; "
        "use ~5e-7 for a large pretrained base (TRL's default is 1e-6)."
    )
    per_device_train_batch_size: int = Field(8, ge=1, description="Preference pairs per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes accumulated into one optimizer step.")
    max_length: int = Field(
        512, ge=8, description="Maximum tokens of prompt + answer; longer chosen/rejected sequences are truncated at "
        "the end, and pairs whose prompt alone fills it are dropped."
    )
    beta: float = Field(
        0.1, gt=0.0, description="Strength of the pull towards the reference (SFT) model; higher beta: the policy "
        "stays closer to it. For loss_type 'ipo' it is the regularization tau."
    )
    loss_type: list[DPOLossType] = Field(
        default_factory=lambda: ["sigmoid"], min_length=1,
        description="DPO loss(es): 'sigmoid' is the original DPO loss; 'ipo', 'hinge', 'robust' (noisy labels, with "
        "label_smoothing) and others as in TRL. Several are summed with loss_weights.",
    )
    loss_weights: list[float] | None = Field(
        None, description="Weight of each loss in loss_type (same length); empty: every loss weighs 1."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed probability that a preference label is flipped ('robust' loss; "
        "conservative DPO for 'sigmoid')."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warmup.")
    logging_steps: int = Field(10, ge=1, description="Log loss, reward accuracy and margins every N steps.")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (oldest deleted first).")
    seed: int = Field(0, description="Seed for data order and dropout.")
    lora: LoraOptions = Field(
        default_factory=LoraOptions,
        description="Train LoRA adapters instead of all weights; the reference is then the model with adapters off.",
    )


# ---------------------------------------------------------------- held-out measurement


def answer_logps(model, tokenizer, prompts: list[str], answers: list[str], max_length: int = 512,
                 batch_size: int = 16) -> list[float]:
    """Sum of log p(answer tokens + EOS | prompt) under `model`, per (prompt, answer), chat-templated as DPO trains."""
    import torch

    rows = [encode_prompt_completion(tokenizer, [{"role": "user", "content": p}], a) for p, a in zip(prompts, answers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = [(ids[:max_length], n_prompt) for ids, n_prompt in rows[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (ids, n_prompt) in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
                mask[i, n_prompt : len(ids)] = True
            input_ids, attention, mask = input_ids.to(device), attention.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            # Position t predicts token t+1.
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
            out.extend(float(v) for v in (logps * mask[:, 1:]).sum(-1).cpu())
    model.train(was_training)
    return out


def reference_logps(model, tokenizer, table: pa.Table, max_length: int) -> dict[str, list[float]]:
    """Log-probs of the chosen and the rejected answers of a preference table."""
    prompts = table.column("prompt").to_pylist()
    return {
        side: answer_logps(model, tokenizer, prompts, table.column(side).to_pylist(), max_length)
        for side in ("chosen", "rejected")
    }


def implicit_reward_stats(policy: dict[str, list[float]], reference: dict[str, list[float]], beta: float) -> dict[str, float]:
    """Preference accuracy (a tie counts 1/2) and mean margin of the implicit reward beta * (log p - log p_ref)."""
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(policy["chosen"], reference["chosen"], policy["rejected"], reference["rejected"])
    ]
    if not margins:
        raise AlignError(f"{STAGE}: no held-out pairs to measure")
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"accuracy": wins / len(margins), "margin": sum(margins) / len(margins)}


def side_nll(model, tokenizer, table: pa.Table, side: str, max_length: int) -> float:
    """Held-out completion NLL per token of the `side` ('chosen' or 'rejected') answers (sft.completion_nll)."""
    view = pa.table({"prompt": table.column("prompt"), "completion": table.column(side)})
    # An empty sampled answer is a fair rejected answer, but it has no tokens to score but its EOS.
    view = view.filter(pa.array([bool(text and text.strip()) for text in view["completion"].to_pylist()]))
    return completion_nll(model, tokenizer, view, max_length) if view.num_rows else float("nan")


# ---------------------------------------------------------------- training


def build_dpo_trainer(model, tokenizer, train_table: pa.Table, options: DPOOptions, checkpoint_dir: Path,
                      callbacks: list[TrainerCallback] | None = None):
    """The configured DPOTrainer; the reference model is TRL's frozen copy of `model` (or adapters off, with LoRA)."""
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **step_trainer_arguments(options, checkpoint_dir),
        beta=options.beta,
        loss_type=list(options.loss_type),
        loss_weights=options.loss_weights,
        label_smoothing=options.label_smoothing,
        eval_strategy="no",
    )
    quiet_progress_bars()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=preference_dataset(train_table),
        processing_class=tokenizer,
        peft_config=options.lora.peft_config("CAUSAL_LM"),
        callbacks=callbacks,
    )
    drop_printer(trainer)
    return trainer


def train_dpo(
    sft_dir: Path,
    preferences_path: Path,
    heldout_preferences_path: Path | None,
    output_dir: Path,
    options: DPOOptions,
    checkpoint_dir: Path,
    log: Log = print,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """DPO-train the SFT model in `sft_dir` on the preference pairs; save model + tokenizer to `output_dir`.

    Returns steps, the loss / reward-accuracy / margin curves [[step, value], ...], held-out implicit
    reward accuracy and margin and chosen/rejected NLL before and after (when `heldout_preferences_path`
    is given, else None), and where it resumed from. `callbacks`: extra TrainerCallbacks.
    """
    from transformers import AutoModelForCausalLM, set_seed

    sft_dir, output_dir, checkpoint_dir = Path(sft_dir), Path(output_dir), Path(checkpoint_dir)
    tokenizer = load_tokenizer(sft_dir, STAGE)
    train_table = read_preferences(preferences_path)
    heldout = read_preferences(heldout_preferences_path) if heldout_preferences_path is not None else None
    guard_checkpoint_dir(checkpoint_dir, STAGE, options)

    set_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft_dir)).to(torch_device())
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    before: dict[str, Any] = {}
    reference = None
    if heldout is not None:
        # The policy starts as the reference: these log-probs are the reference's for the whole run.
        reference = reference_logps(model, tokenizer, heldout, options.max_length)
        before = {
            **implicit_reward_stats(reference, reference, options.beta),
            "chosen_nll": side_nll(model, tokenizer, heldout, "chosen", options.max_length),
            "rejected_nll": side_nll(model, tokenizer, heldout, "rejected", options.max_length),
        }
        log(f"{STAGE}: {train_table.num_rows} train / {heldout.num_rows} held-out pairs; held-out chosen NLL "
            f"{before['chosen_nll']:.4f}, rejected NLL {before['rejected_nll']:.4f} before training")
    else:
        log(f"{STAGE}: {train_table.num_rows} train pairs, no held-out pairs")

    trainer = build_dpo_trainer(
        model, tokenizer, train_table, options, checkpoint_dir,
        callbacks=[StreamLogs(STAGE, log), StopOnNonFinite(STAGE), *(callbacks or [])],
    )
    dropped = train_table.num_rows - len(trainer.train_dataset)
    if dropped:
        log(f"{STAGE}: {dropped} pairs whose prompt fills max_length={options.max_length} tokens were dropped")
    if len(trainer.train_dataset) == 0:
        raise AlignError(f"{STAGE}: every training prompt is longer than max_length={options.max_length} tokens")
    result, resume, model = train_from_latest_checkpoint(trainer, checkpoint_dir, options.lora.enabled, STAGE, log)

    after: dict[str, Any] = {}
    if heldout is not None:
        policy = reference_logps(model, tokenizer, heldout, options.max_length)
        after = {
            **implicit_reward_stats(policy, reference, options.beta),
            "chosen_nll": side_nll(model, tokenizer, heldout, "chosen", options.max_length),
            "rejected_nll": side_nll(model, tokenizer, heldout, "rejected", options.max_length),
        }
        log(f"{STAGE}: held-out implicit reward accuracy {after['accuracy']:.3f} (before {before['accuracy']:.3f}), "
            f"margin {after['margin']:.4f}; chosen NLL {after['chosen_nll']:.4f} (before {before['chosen_nll']:.4f}), "
            f"rejected NLL {after['rejected_nll']:.4f} (before {before['rejected_nll']:.4f})")

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    history = trainer.state.log_history
    return {
        "steps": trainer.state.global_step,
        "train_loss": loss_curve(history, "loss"),
        "train_reward_accuracy": loss_curve(history, "rewards/accuracies"),
        "train_reward_margin": loss_curve(history, "rewards/margins"),
        "heldout_before": before or None,
        "heldout_after": after or None,
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "train_pairs": len(trainer.train_dataset),
        "dropped_too_long": dropped,
        "heldout_pairs": heldout.num_rows if heldout is not None else 0,
        "resumed_from": resume.name if resume else None,
    }
