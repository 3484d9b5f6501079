"""RLOO: the SFT policy learns from our reward model with TRL's `RLOOTrainer` (stable API), instead of PPO.

REINFORCE with a leave-one-out baseline: for each prompt the policy samples `num_generations`
answers, each answer's advantage is its reward minus the mean reward of the other answers to the
same prompt, and a KL penalty to the frozen SFT model (weight `beta`) is subtracted from the reward.
No value model is trained.

    metrics = train_rloo(sft_dir, rm_dir, Path("prompts.parquet"), out_dir, RLOOOptions(), ckpt_dir,
                         log=logger.info)

The reward is our reward model (`tasks.align.reward`), handed to TRL as a reward *function*
(`RewardModelReward`), not as a model: TRL decodes each sampled answer to text, and the function
scores (prompt, answer) with `reward_scores`, i.e. the chat template of the exchange ending with
EOS, read at that EOS - the very ids RM training and the RM evaluation use. An answer that ran out
of tokens without EOS gets `missing_eos_penalty` subtracted (its text would otherwise be scored as
if the answer had ended).

Calling it again with the same checkpoint_dir resumes from the newest complete checkpoint there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field, model_validator
from transformers import TrainerCallback

from tasks.align.config import LoraOptions
from tasks.align.devices import torch_device
from tasks.align.ppo import chat_query_ids, load_prompts
from tasks.align.reward import check_reward_tokenizer, load_reward_model, reward_scores
from tasks.align.sft import (
    AlignError,
    StopOnNonFinite,
    StreamLogs,
    drop_printer,
    guard_checkpoint_dir,
    load_tokenizer,
    loss_curve,
    quiet_progress_bars,
    step_trainer_arguments,
    train_from_latest_checkpoint,
)

Log = Callable[[str], None]
STAGE = "rloo"


class RLOOOptions(BaseModel):
    """RLOO with TRL's RLOOTrainer: sampled answers scored by the reward model, leave-one-out baseline, KL to SFT."""

    max_steps: int = Field(40, ge=1, description="Total number of optimizer steps (one batch of sampled answers each).")
    learning_rate: float = Field(
        3e-4, gt=0.0, description="Peak learning rate of AdamW (linear decay). TRL's default 1e-6 is too small for "
        "the project's tiny models; use ~1e-6 for a large pretrained base."
    )
    per_device_train_batch_size: int = Field(
        32, ge=2, description="Sampled answers (not prompts) per device per step: per_device_train_batch_size / "
        "num_generations prompts."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes accumulated into one optimizer step.")
    num_generations: int = Field(
        4, ge=2, description="Answers sampled per prompt; each one's baseline is the mean reward of the others."
    )
    max_completion_length: int = Field(40, ge=1, description="Most tokens sampled per answer.")
    max_prompt_length: int = Field(
        256, ge=1, description="Prompts longer than this many tokens (with the chat template) are left out."
    )
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature of the answers.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set of this "
                         "probability mass (1.0: off).")
    beta: float = Field(
        0.05, ge=0.0, description="Weight of the KL penalty to the frozen SFT model, subtracted from the reward "
        "(0: no reference model, no leash)."
    )
    num_iterations: int = Field(1, ge=1, description="Gradient passes over each batch of sampled answers.")
    epsilon: float = Field(0.2, gt=0.0, description="Clip range of the policy ratio (matters with num_iterations > 1).")
    normalize_advantages: bool = Field(False, description="Scale the advantages of each batch to mean 0, std 1.")
    missing_eos_penalty: float | None = Field(
        1.0, ge=0.0, description="Subtracted from the reward of answers that end without EOS; empty: none."
    )
    reward_batch_size: int = Field(32, ge=1, description="Answers the reward model scores per forward pass.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warmup.")
    logging_steps: int = Field(5, ge=1, description="Log reward, KL, answer length and loss every N steps.")
    save_steps: int = Field(20, ge=1, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (oldest deleted first).")
    seed: int = Field(0, description="Seed of sampling, prompt order and dropout.")
    lora: LoraOptions = Field(
        default_factory=LoraOptions,
        description="Train LoRA adapters instead of all weights; the reference is then the model with adapters off.",
    )

    @model_validator(mode="after")
    def _whole_prompt_groups(self) -> "RLOOOptions":
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * gradient_accumulation_steps = {batch} must be a multiple of "
                f"num_generations={self.num_generations} (each batch holds whole groups of answers to a prompt)"
            )
        return self


class RewardModelReward:
    """TRL reward function: our reward model's score of each (prompt, answer), minus a penalty for a missing EOS.

    TRL calls it with the conversational prompts (message lists), the decoded answers
    (`[{"role": "assistant", "content": text}]`) and the sampled answer ids (cut after the first
    EOS). The score is `reward.reward_scores`: the chat-templated exchange read at its EOS, as in RM
    training. The raw RM mean and the missing-EOS rate go to TRL's logs as `rm_score` and
    `missing_eos_rate`.
    """

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, missing_eos_penalty: float | None, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.missing_eos_penalty = missing_eos_penalty
        self.batch_size = batch_size

    def __call__(self, prompts, completions, completion_ids, log_metric=None, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = reward_scores(self.model, self.tokenizer, prompts, texts, self.batch_size)
        eos = self.tokenizer.eos_token_id
        ended = [bool(ids) and ids[-1] == eos for ids in completion_ids]
        if log_metric is not None:
            log_metric("rm_score", sum(scores) / len(scores))
            log_metric("missing_eos_rate", 1.0 - sum(ended) / len(ended))
        if self.missing_eos_penalty:
            scores = [s if done else s - self.missing_eos_penalty for s, done in zip(scores, ended)]
        return scores


def check_same_tokenizer(policy_tokenizer, rm_tokenizer, sft_dir: Path, rm_dir: Path) -> None:
    """The RM reads the policy's answers through the policy's tokenizer: both must be the same one."""
    same = (
        policy_tokenizer.get_vocab() == rm_tokenizer.get_vocab()
        and policy_tokenizer.eos_token_id == rm_tokenizer.eos_token_id
        and policy_tokenizer.pad_token_id == rm_tokenizer.pad_token_id
        and policy_tokenizer.chat_template == rm_tokenizer.chat_template
    )
    if not same:
        raise AlignError(
            f"{STAGE}: the reward model in {rm_dir} has another tokenizer or chat template than the policy in "
            f"{sft_dir}; it would score different tokens than it was trained on"
        )


def prompt_dataset(prompts: list[str]):
    """TRL's conversational prompt-only format (RLOOTrainer adds the generation prompt of the chat template)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})


def build_rloo_trainer(model, tokenizer, reward: RewardModelReward, prompts: list[str], options: RLOOOptions,
                       checkpoint_dir: Path, callbacks: list[TrainerCallback] | None = None):
    """The configured RLOOTrainer; the reference model is TRL's frozen copy of `model` (or adapters off)."""
    from trl import RLOOConfig, RLOOTrainer

    config = RLOOConfig(
        **step_trainer_arguments(options, checkpoint_dir),
        num_generations=options.num_generations,
        max_completion_length=options.max_completion_length,
        temperature=options.temperature,
        top_p=options.top_p,
        beta=options.beta,
        num_iterations=options.num_iterations,
        epsilon=options.epsilon,
        normalize_advantages=options.normalize_advantages,
        eval_strategy="no",
    )
    quiet_progress_bars()
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=prompt_dataset(prompts),
        processing_class=tokenizer,
        peft_config=options.lora.peft_config("CAUSAL_LM"),
        callbacks=callbacks,
    )
    drop_printer(trainer)
    return trainer


def _last(history: list[dict], key: str) -> float | None:
    return next((float(e[key]) for e in reversed(history) if key in e), None)


def train_rloo(
    sft_dir: Path,
    rm_dir: Path,
    prompts_path: Path,
    output_dir: Path,
    options: RLOOOptions,
    checkpoint_dir: Path,
    log: Log = print,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """RLOO-train the SFT model in `sft_dir` against the reward model in `rm_dir` on the prompts
    (a Parquet file with a `prompt` column); save model + tokenizer to `output_dir`.

    Returns steps, the curves [[step, value], ...] of the reward (RM score minus missing-EOS
    penalty), the raw RM score, KL to the SFT model (per token), answer length and loss, the final
    values of those, and where it resumed from. `callbacks`: extra TrainerCallbacks.
    """
    from transformers import AutoModelForCausalLM, set_seed

    sft_dir, rm_dir = Path(sft_dir), Path(rm_dir)
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    tokenizer = load_tokenizer(sft_dir, STAGE)
    check_reward_tokenizer(tokenizer, sft_dir)
    if not Path(rm_dir).is_dir():
        raise AlignError(f"{STAGE}: reward model folder {rm_dir} does not exist")
    reward_model, rm_tokenizer = load_reward_model(rm_dir)
    check_same_tokenizer(tokenizer, rm_tokenizer, sft_dir, rm_dir)
    if reward_model.config.pad_token_id is None:
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.requires_grad_(False)

    all_prompts = load_prompts(Path(prompts_path))
    prompts = [p for p in all_prompts if len(chat_query_ids(tokenizer, p)) <= options.max_prompt_length]
    if len(prompts) < len(all_prompts):
        log(f"{STAGE}: {len(all_prompts) - len(prompts)} prompts longer than max_prompt_length="
            f"{options.max_prompt_length} tokens were left out")
    groups = options.per_device_train_batch_size // options.num_generations
    if len(prompts) < groups:
        raise AlignError(f"{STAGE}: {len(prompts)} usable prompts are fewer than the {groups} prompts of one batch")
    guard_checkpoint_dir(checkpoint_dir, STAGE, options)

    set_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft_dir)).to(torch_device())
    model.config.pad_token_id = tokenizer.pad_token_id
    log(f"{STAGE}: {len(prompts)} prompts, {groups} prompts x {options.num_generations} answers per step, "
        f"{options.max_steps} steps")

    reward = RewardModelReward(reward_model, tokenizer, options.missing_eos_penalty, options.reward_batch_size)
    trainer = build_rloo_trainer(
        model, tokenizer, reward, prompts, options, checkpoint_dir,
        callbacks=[StreamLogs(STAGE, log), StopOnNonFinite(STAGE), *(callbacks or [])],
    )
    result, resume, model = train_from_latest_checkpoint(trainer, checkpoint_dir, options.lora.enabled, STAGE, log)

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    history = trainer.state.log_history
    curves = {
        "reward": "reward",
        "rm_score": "rm_score",
        "kl": "kl",
        "response_length": "completions/mean_length",
        "missing_eos_rate": "missing_eos_rate",
        "loss": "loss",
    }
    return {
        "steps": trainer.state.global_step,
        **{f"{name}_curve": loss_curve(history, key) for name, key in curves.items()},
        "final": {name: _last(history, key) for name, key in curves.items()},
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "prompts": len(prompts),
        "resumed_from": resume.name if resume else None,
    }
