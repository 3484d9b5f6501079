"""Typed options for the align stages (SFT, preference pairs, reward model).

Each field carries a help text: the models become Prefect UI forms and command-line help. The
names follow TRL's (`max_steps`, `learning_rate`, `per_device_train_batch_size`, ...) so a TRL user
finds the knob they expect. The defaults suit the project's own small models on a CPU; a larger
pretrained base wants a smaller learning rate. PPO's options live with PPO (`tasks.align.ppo`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from tasks.generation.params import DecodingParams


class LoraOptions(BaseModel):
    """Low-rank adapters (peft) instead of full fine-tuning; merged into the weights before saving."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(8, ge=1, description="LoRA rank: the inner dimension of each adapter.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator: adapters are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear layers that get adapters, or 'all-linear' for every linear layer "
        "except the output head.",
    )

    def peft_config(self, task_type: str):
        """peft's LoraConfig for a model of `task_type` (CAUSAL_LM, SEQ_CLS); None when LoRA is off."""
        if not self.enabled:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type=task_type)


class SplitOptions(BaseModel):
    """How the instruction data is split into train, validation and test (by a hash of the prompt).

    Validation picks (early stopping, the best checkpoint); test only reports, and every gate is judged
    on it. Preference pairs and PPO prompts inherit their prompt's side.
    """

    validation_fraction: float = Field(
        0.12, gt=0.0, lt=1.0, description="Fraction of prompts for validation: early stopping and best-checkpoint choice.")
    test_fraction: float = Field(
        0.22, gt=0.0, lt=1.0, description="Fraction of prompts for test: the reported metrics and the quality gates; "
        "nothing is selected on them.")
    seed: int = Field(0, description="Seed of the split hash; another seed gives another, equally fixed, split.")

    @model_validator(mode="after")
    def _room_for_training(self) -> "SplitOptions":
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"validation_fraction + test_fraction = {self.validation_fraction + self.test_fraction:.2f} "
                             "leaves less than 10% of the prompts for training")
        return self


class SFTOptions(BaseModel):
    """Supervised fine-tuning with TRL's SFTTrainer: chat template, EOS-terminated targets."""

    num_train_epochs: float = Field(
        8.0, gt=0.0, description="Most passes over the training examples; early stopping usually ends training sooner.")
    max_steps: int | None = Field(
        None, ge=1, description="Cap on optimizer steps, overriding num_train_epochs; empty: train by epochs.")
    early_stopping_patience: int | None = Field(
        1, ge=1, description="Stop after this many evaluations without a lower validation loss, then restore the best "
        "checkpoint; empty: train every epoch and still restore the best.")
    learning_rate: float = Field(
        1e-3, gt=0.0, description="Peak learning rate of AdamW (linear decay). 1e-3 suits the project's tiny "
        "models; use ~2e-5 for a large pretrained base."
    )
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes accumulated into one optimizer step (effective batch multiplier)."
    )
    max_length: int = Field(
        512, ge=8, description="Maximum tokens of prompt + completion; longer examples are truncated at the end."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    logging_steps: int = Field(10, ge=1, description="Log the training loss every N steps (streamed to the run log).")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate the validation loss (and write a resumable checkpoint) every N steps; empty: "
        "once per epoch."
    )
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (oldest deleted first).")
    seed: int = Field(0, description="Seed for weight init of new parts, data order and dropout.")
    completion_only_loss: bool = Field(
        True, description="Compute the loss on the completion (answer + EOS) only, not on the prompt."
    )
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA adapters (peft) instead of full training.")


class PreferenceOptions(BaseModel):
    """Preference pairs: K sampled responses per prompt from the SFT model, ranked by a judge."""

    num_samples: int = Field(4, ge=1, description="K: responses sampled per prompt from the SFT model.")
    judge: Literal["reference", "llm", "human", "file"] = Field(
        "reference",
        description="Who ranks the responses. reference: ROUGE-L closeness to the dataset's reference answer "
        "(the reference itself is the chosen answer); llm: a generator compares A vs B twice with the positions "
        "swapped and a pair is kept only when both orders agree; human: a person picks in a Prefect form; "
        "file: labels imported from a Parquet file (labels_path).",
    )
    decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=1.5, max_new_tokens=32, seed=0),
        description="How the K responses are sampled (temperature, top_p, max_new_tokens, ...). Hot by default: the "
        "reference judge pairs the reference with the sample least like it, and on the demo data a reward model learns "
        "those pairs far better when the rejected samples are clearly worse (test accuracy 0.62 at temperature 1.0, "
        "0.86 at 1.5).",
    )
    pairs_per_prompt: int = Field(
        2, ge=1, description="Pairs made per prompt (a reward model needs at least 2 per prompt to learn "
        "topic-level signals). With the human judge: comparisons shown per prompt."
    )
    labels_path: str | None = Field(
        None, description="Parquet file with prompt, chosen, rejected columns (judge='file' only)."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Use at most this many distinct prompts of each split (train, validation, test: the first ones)."
    )
    length_bias_control: bool = Field(
        False,
        description="LLM judge: drop a pair when the chosen response is longer than the rejected one by more "
        "than max_length_ratio (judges favour long answers), unless the rejected response is empty.",
    )
    max_length_ratio: float = Field(
        1.5, gt=1.0, description="With length_bias_control: the largest chosen/rejected length ratio (in characters) kept."
    )
    judge_max_new_tokens: int = Field(8, ge=1, description="LLM judge: tokens the judge may write for its verdict.")
    seed: int = Field(0, description="Seed for sampling and for the order in which the human judge sees A and B.")


class RewardOptions(BaseModel):
    """Reward model training with TRL's RewardTrainer: a scalar head on the SFT backbone."""

    num_train_epochs: float = Field(
        6.0, gt=0.0, description="Most passes over the training pairs; early stopping usually ends training sooner.")
    max_steps: int | None = Field(
        None, ge=1, description="Cap on optimizer steps, overriding num_train_epochs; empty: train by epochs.")
    early_stopping_patience: int | None = Field(
        2, ge=1, description="Stop after this many evaluations without a higher validation accuracy, then restore the "
        "best checkpoint; empty: train every epoch and still restore the best.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate validation accuracy (and write a resumable checkpoint) every N steps; empty: "
        "once per epoch.")
    learning_rate: float = Field(
        1e-3, gt=0.0, description="Peak learning rate of AdamW (linear decay). 1e-3 suits the project's tiny models; use ~1e-5 "
        "for a large pretrained base."
    )
    per_device_train_batch_size: int = Field(8, ge=1, description="Preference pairs per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes accumulated into one optimizer step.")
    max_length: int = Field(
        512, ge=8, description="Pairs whose chosen or rejected text (prompt + response) is longer are dropped."
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Pull rewards towards zero mean with this weight (e.g. 0.01); empty: off."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warmup.")
    logging_steps: int = Field(10, ge=1, description="Log loss and accuracy every N steps (streamed to the run log).")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (oldest deleted first).")
    seed: int = Field(0, description="Seed for the new score head, data order and the pair split.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA adapters (peft) instead of full training.")
