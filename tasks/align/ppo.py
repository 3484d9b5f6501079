"""PPO for the align stage: the SFT policy learns from the reward model, on a KL leash to the SFT model.

Our small interface in front of TRL 1.12's `trl.experimental.ppo.PPOTrainer` (the only TRL version
that ships it), so that the trainer can be replaced when TRL changes:

    metrics = train_ppo(sft_dir, rm_dir, Path("prompts.parquet"), out_dir, PPOOptions(total_updates=30),
                        checkpoint_dir=work_dir)

- The policy starts as the SFT model, the reference is a frozen SFT copy, the reward comes from the
  RM, and the value model starts from the RM.
- The RM must be read at the same token in PPO as in RM training (the EOS that ends the answer).
  `check_reward_reading` checks that before any training: TRL reads the score at the last token of
  the answer truncated at EOS, and sequence classification reads it at the last non-pad token.
- Exact resume: TRL's PPO cannot resume, so `PPORun` adds it from outside `train()`:
  * the trainer is always built for the full run, so the LR schedule matches;
  * the prompt batches depend only on (seed, update) (`PromptBatches`);
  * at the end of every `checkpoint_every` updates, policy, value model, optimizer, scheduler, all
    RNGs (python, numpy (TRL shuffles minibatches with numpy), torch), `global_step`, `episode` and
    the log history are written atomically into `checkpoint_dir`; they are restored at train begin.
  A run killed after a checkpoint and restarted ends with the same weights as an uninterrupted one.
- A response-length monitor logs the mean response length and the missing-EOS rate per update,
  and warns when the length grows sharply while KL grows (a sign of reward hacking).

Devices: on a GPU the models train in fp32 with bf16 autocast; on a CPU in plain fp32 with
`use_cpu=True` (TRL's configs default to bf16, which fails without a GPU).

Tests: `pytest tests/tasks/align/test_ppo.py` (slow; tiny models built from scratch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator
from transformers import TrainerCallback

from tasks.align.config import LoraOptions

DEFAULT_UPDATES = 30
CHECKPOINT_PREFIX = "ppo-step-"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
# Options that may change between a killed run and its resume without changing the result.
RESUME_NEUTRAL_FIELDS = {"checkpoint_every", "keep_checkpoints", "length_monitor_window", "length_growth_warning"}


class PPOError(ValueError):
    """Bad input to PPO (prompts, models, tokenizer, options, checkpoints); raised before training."""


class PPODiverged(RuntimeError):
    """Training produced NaN or infinite values; the message names the update."""


class PPOOptions(BaseModel):
    """PPO settings. The defaults are the ones measured to give a clear, seed-stable gain on tiny models."""

    total_updates: int | None = Field(
        None,
        ge=1,
        description=f"PPO updates (rollout batches) to run; each samples per_device_train_batch_size prompts. "
        f"Set this or total_episodes; neither: {DEFAULT_UPDATES} updates.",
    )
    total_episodes: int | None = Field(
        None,
        ge=1,
        description="Alternative to total_updates, in sampled responses (TRL's unit): "
        "updates = ceil(total_episodes / per_device_train_batch_size).",
    )
    per_device_train_batch_size: int = Field(32, ge=2, description="Prompts sampled per update (the rollout batch).")
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Must stay 1: TRL's PPOTrainer silently merges PPO minibatches when it is larger.",
    )
    num_mini_batches: int = Field(
        2, ge=1, description="Minibatches each rollout batch is split into for the PPO gradient steps."
    )
    num_ppo_epochs: int = Field(4, ge=1, description="Passes of PPO gradient steps over each rollout batch.")
    learning_rate: float = Field(
        3e-5, gt=0.0, description="AdamW learning rate (linear decay). TRL's default 3e-6 is too small for small models."
    )
    kl_coef: float = Field(0.05, ge=0.0, description="Weight of the per-token KL penalty to the frozen SFT model.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="KL estimator in the reward: k1 (log ratio, unbiased) or k3 (lower variance)."
    )
    cliprange: float = Field(0.2, gt=0.0, description="PPO clip range of the policy ratio.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value-function loss.")
    cliprange_value: float = Field(0.2, gt=0.0, description="Clip range of the value predictions.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor of the GAE returns.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="Lambda of generalized advantage estimation.")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards before computing advantages.")
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature of the rollouts.")
    response_length: int = Field(40, ge=1, description="Most tokens sampled per response.")
    stop_token: Literal["eos"] | None = Field(
        "eos",
        description="Token that ends a response: 'eos' truncates each response after its first EOS (the RM is "
        "read there); empty: no truncation (not recommended).",
    )
    missing_eos_penalty: float | None = Field(
        1.0, ge=0.0, description="Subtracted from the reward of responses that end without EOS; empty: none."
    )
    max_prompt_length: int = Field(
        256, ge=1, description="Prompts longer than this many tokens (with the chat template) are left out."
    )
    checkpoint_every: int = Field(
        10, ge=1, description="Write a resumable checkpoint every N updates (and after the last one)."
    )
    keep_checkpoints: int = Field(2, ge=1, le=10, description="Checkpoints kept in checkpoint_dir (older ones deleted).")
    length_monitor_window: int = Field(
        5, ge=1, description="Updates averaged by the response-length monitor (first window vs latest window)."
    )
    length_growth_warning: float = Field(
        0.5,
        gt=0.0,
        description="Warn (possible reward hacking) when the mean response length of the latest window exceeds "
        "the first window's by this fraction while KL grows.",
    )
    seed: int = Field(0, description="Seed of sampling, prompt order, minibatch shuffles and new weights.")
    lora: LoraOptions = Field(
        default_factory=LoraOptions, description="Train LoRA adapters on the policy instead of all its weights."
    )

    @field_validator("gradient_accumulation_steps")
    @classmethod
    def _no_accumulation(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                f"gradient_accumulation_steps={value} is refused: TRL's PPOTrainer merges the PPO minibatches of "
                "accumulated steps without saying so. Raise per_device_train_batch_size or lower num_mini_batches "
                "instead."
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PPOOptions":
        if self.total_updates is not None and self.total_episodes is not None:
            raise ValueError("set total_updates or total_episodes, not both")
        if self.per_device_train_batch_size % self.num_mini_batches:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} must be a multiple of "
                f"num_mini_batches={self.num_mini_batches}"
            )
        if self.per_device_train_batch_size // self.num_mini_batches < 2:
            raise ValueError("each PPO minibatch needs at least 2 responses (advantages are whitened per minibatch)")
        return self

    @property
    def num_updates(self) -> int:
        if self.total_updates is not None:
            return self.total_updates
        if self.total_episodes is not None:
            return math.ceil(self.total_episodes / self.per_device_train_batch_size)
        return DEFAULT_UPDATES

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the result; a checkpoint is only resumed under the same ones."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RESUME_NEUTRAL_FIELDS}


# ---------------------------------------------------------------------------------------------------
# Inputs


def load_prompts(path: Path) -> list[str]:
    """The `prompt` column of a Parquet file, validated (no missing or blank prompts)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise PPOError(f"{path}: prompts file not found")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise PPOError(f"{path}: not a readable Parquet file ({exc})") from exc
    if "prompt" not in table.column_names:
        raise PPOError(f"{path}: no `prompt` column (columns: {', '.join(table.column_names)})")
    prompts = table.column("prompt").to_pylist()
    if not prompts:
        raise PPOError(f"{path}: the table has no rows")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PPOError(f"{path}: row {row}: field `prompt` is {prompt!r}; every prompt must be non-empty text")
    return prompts


def check_tokenizer(tokenizer, where: Path) -> None:
    """The tokenizer facts PPO relies on; a clear error instead of a silent wrong reward."""
    if not getattr(tokenizer, "chat_template", None):
        raise PPOError(f"{where}: the tokenizer has no chat template")
    if tokenizer.eos_token_id is None:
        raise PPOError(f"{where}: the tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        raise PPOError(f"{where}: the tokenizer has no pad token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise PPOError(
            f"{where}: pad and EOS are the same token ({tokenizer.eos_token_id}); TRL's PPO finds the end of a "
            "response by its first pad, so it would read the reward one token early"
        )


def chat_query_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user prompt followed by the assistant header (what the policy continues)."""
    messages = [{"role": "user", "content": prompt}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def chat_full_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of a whole exchange, as the reward model saw it in training."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def check_reward_reading(reward_model, tokenizer, prompt: str, response: str = "Yes.") -> dict[str, float]:
    """Check that PPO reads the RM at the token RM training read it: the EOS ending the answer.

    RM training scores the templated exchange at its last token. PPO (TRL's `get_reward`) scores the
    left-padded query plus the sampled answer truncated after its first EOS, at the last non-pad
    token. Both must be the same token with the same score; a chat template that puts anything after
    the assistant's EOS (e.g. a newline) breaks that and PPO would optimise a different number.
    """
    import torch
    from trl.experimental.utils import get_reward

    query = chat_query_ids(tokenizer, prompt)
    full = chat_full_ids(tokenizer, prompt, response)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if full[: len(query)] != query:
        raise PPOError(
            "the chat template renders the prompt differently with and without an answer, so the policy's "
            "query is not a prefix of the exchange the reward model was trained on"
        )
    answer = full[len(query) :]
    if eos not in answer:
        raise PPOError("the chat template does not end the assistant's answer with EOS; PPO reads the reward there")
    if answer[-1] != eos:
        after = answer[answer.index(eos) + 1 :]
        raise PPOError(
            f"the chat template puts {tokenizer.decode(after)!r} after the assistant's EOS; the reward model is "
            "trained reading the last token but PPO reads it at EOS. Remove anything after the final EOS."
        )
    device = next(reward_model.parameters()).device
    with torch.no_grad():
        trained = reward_model(input_ids=torch.tensor([full], device=device)).logits[0, 0].item()
        # As in a PPO batch: the query left-padded, the answer truncated after EOS and right-padded.
        row = torch.tensor([[pad, pad] + query + answer + [pad, pad]], device=device)
        _, in_ppo, _ = get_reward(reward_model, row, pad, len(query) + 2)
    read = in_ppo[0].item()
    if not math.isclose(trained, read, rel_tol=1e-3, abs_tol=1e-3):
        raise PPOError(
            f"the reward model scores the same exchange {trained:.4f} as in training but {read:.4f} as PPO reads "
            "it; check the RM config's pad_token_id and that the template ends the answer with EOS"
        )
    return {"trained": trained, "ppo": read}


# ---------------------------------------------------------------------------------------------------
# Deterministic batches and checkpoints


class PromptBatches:
    """Batch sampler whose batch for update s depends only on (seed, s): a resume needs no sampler state.

    Epoch e is a permutation of the prompts drawn from its own generator seeded with (seed, e); the
    last incomplete batch of an epoch is dropped. It is infinite: TRL's loop asks for one batch per update.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        if num_prompts < batch_size:
            raise PPOError(
                f"{num_prompts} usable prompts are fewer than per_device_train_batch_size={batch_size}"
            )
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.start_update = 0  # set on resume, before TRL's loop asks for the first batch

    @property
    def batches_per_epoch(self) -> int:
        return self.num_prompts // self.batch_size

    def batch(self, update: int) -> list[int]:
        epoch, position = divmod(update, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        update = self.start_update
        while True:
            yield self.batch(update)
            update += 1


class CheckpointStore:
    """Checkpoint folders `ppo-step-000010/` in one folder, each written complete or not at all."""

    def __init__(self, folder: Path, keep: int):
        self.folder = Path(folder)
        self.keep = keep

    def list(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / META_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        import torch

        from storage.atomic import fsync_dir

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = self.folder / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        with open(tmp / META_FILE, "w") as handle:
            json.dump(meta, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # a rerun of a step (e.g. the last one); the old copy is equivalent
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.folder)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            if stale != tmp:  # left by a killed writer
                shutil.rmtree(stale, ignore_errors=True)
        return final

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        meta = json.loads((path / META_FILE).read_text())
        # weights_only=False: the state holds numpy RNG state and python tuples, written by us.
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        return state, meta


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# Response-length monitor


def length_warning(history: list[dict[str, Any]], window: int, growth: float) -> str | None:
    """A warning when responses got much longer while KL grew (first window vs latest window), else None.

    Longer answers that the RM happens to like, bought with distance from the SFT model, are the
    usual shape of reward hacking; a rise in reward alone does not say which kind of rise it is.
    """
    if len(history) < 2 * window:
        return None
    first, last = history[:window], history[-window:]
    length_0 = float(np.mean([h["response_length"] for h in first]))
    length_1 = float(np.mean([h["response_length"] for h in last]))
    kl_0 = float(np.mean([h["kl"] for h in first]))
    kl_1 = float(np.mean([h["kl"] for h in last]))
    if length_1 >= max(length_0 * (1 + growth), length_0 + 2) and kl_1 > kl_0:
        return (
            f"possible reward hacking: mean response length rose from {length_0:.1f} to {length_1:.1f} tokens "
            f"while KL rose from {kl_0:.2f} to {kl_1:.2f} nats (updates 1-{window} vs the last {window}); "
            "check the samples"
        )
    return None


# TRL's log keys -> ours (plain names, stable if the trainer is replaced).
LOG_KEYS = {
    "objective/scores": "score",
    "objective/kl": "kl",
    "objective/rlhf_reward": "rlhf_reward",
    "objective/non_score_reward": "non_score_reward",
    "objective/entropy": "entropy",
    "policy/approxkl_avg": "approx_kl",
    "policy/clipfrac_avg": "clip_fraction",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "val/ratio": "ratio",
    "lr": "learning_rate",
    "episode": "episode",
}


# ---------------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class PPORun:
    """One PPO run: loads the models, builds TRL's trainer for the full run, resumes, trains, saves.

    The only class that touches TRL's PPO; replace it (keeping `train` and `save_policy`) when TRL changes.
    """

    def __init__(
        self,
        policy_dir: Path,
        reward_dir: Path,
        prompts: list[str],
        options: PPOOptions,
        checkpoint_dir: Path,
        log: Callable[[str], None] = print,
    ):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        from tasks.align.devices import training_device_kwargs

        set_seed(options.seed)  # anything initialised while building (e.g. LoRA adapters) is seeded

        self.options = options
        self.log = log
        self.policy_dir, self.reward_dir = Path(policy_dir), Path(reward_dir)
        for folder, what in ((self.policy_dir, "policy (SFT)"), (self.reward_dir, "reward model")):
            if not (folder / "config.json").is_file():
                raise PPOError(f"{folder}: no {what} model folder here (config.json missing)")

        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_dir)
        check_tokenizer(self.tokenizer, self.policy_dir)
        if (self.reward_dir / "tokenizer_config.json").is_file():
            rm_tokenizer = AutoTokenizer.from_pretrained(self.reward_dir)
            if rm_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise PPOError(
                    f"{self.reward_dir}: the reward model's tokenizer differs from the policy's ({self.policy_dir}); "
                    "PPO hands the policy's token ids to the RM, so both must share one tokenizer"
                )
        self.saved_padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # TRL generates after the query: queries are left-padded

        # Prompts: tokenized with the chat template, too long ones left out (truncating breaks the template).
        query_ids = [chat_query_ids(self.tokenizer, p) for p in prompts]
        keep = [i for i, ids in enumerate(query_ids) if len(ids) <= options.max_prompt_length]
        if len(keep) < len(prompts):
            log(f"PPO: left out {len(prompts) - len(keep)} prompts longer than {options.max_prompt_length} tokens")
        self.prompts = [prompts[i] for i in keep]
        query_ids = [query_ids[i] for i in keep]
        self.query_lengths = [len(ids) for ids in query_ids]
        self.batches = PromptBatches(len(self.prompts), options.per_device_train_batch_size, options.seed)

        policy = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=torch.float32)
        ref_policy = None
        if not options.lora.enabled:
            ref_policy = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=torch.float32)
            ref_policy.eval().requires_grad_(False)
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            self.reward_dir, num_labels=1, dtype=torch.float32
        )
        reward_model.eval().requires_grad_(False)
        value_model = AutoModelForSequenceClassification.from_pretrained(
            self.reward_dir, num_labels=1, dtype=torch.float32
        )
        for model in (reward_model, value_model):
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.tokenizer.pad_token_id
        max_positions = getattr(policy.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids in query_ids) + options.response_length
        if max_positions is not None and longest > max_positions:
            raise PPOError(
                f"the longest prompt ({longest - options.response_length} tokens) plus response_length "
                f"({options.response_length}) exceeds the model's {max_positions} positions; lower "
                "max_prompt_length or response_length"
            )
        self.reading = check_reward_reading(reward_model, self.tokenizer, self.prompts[0])

        device_kwargs = training_device_kwargs()
        scratch = Path(checkpoint_dir) / "trl-scratch"
        config = PPOConfig(
            output_dir=str(scratch),
            total_episodes=options.num_updates * options.per_device_train_batch_size,
            per_device_train_batch_size=options.per_device_train_batch_size,
            gradient_accumulation_steps=options.gradient_accumulation_steps,
            num_mini_batches=options.num_mini_batches,
            num_ppo_epochs=options.num_ppo_epochs,
            learning_rate=options.learning_rate,
            kl_coef=options.kl_coef,
            kl_estimator=options.kl_estimator,
            cliprange=options.cliprange,
            vf_coef=options.vf_coef,
            cliprange_value=options.cliprange_value,
            gamma=options.gamma,
            lam=options.lam,
            whiten_rewards=options.whiten_rewards,
            temperature=options.temperature,
            response_length=options.response_length,
            stop_token=options.stop_token,
            missing_eos_penalty=options.missing_eos_penalty,
            local_rollout_forward_batch_size=options.per_device_train_batch_size,
            num_sample_generations=0,
            save_strategy="no",
            logging_steps=1,
            seed=options.seed,
            **{**device_kwargs, "gradient_checkpointing": False},
        )
        dataset = Dataset.from_dict({"input_ids": query_ids})
        # TRL builds its own Accelerator without our precision: hand it bf16 the way accelerate reads it.
        mixed = "bf16" if config.bf16 else None
        with _env("ACCELERATE_MIXED_PRECISION", mixed):
            self.trainer = PPOTrainer(
                args=config,
                processing_class=self.tokenizer,
                model=policy,
                ref_model=ref_policy,
                reward_model=reward_model,
                train_dataset=dataset,
                value_model=value_model,
                peft_config=options.lora.peft_config("CAUSAL_LM"),
            )
        dtype_note = "fp32 weights, bf16 autocast" if config.bf16 else "fp32"
        self.device = str(self.trainer.accelerator.device)
        self._replace_dataloader(dataset)
        self._quiet_trl()
        self.monitor = _RunCallback(self, CheckpointStore(Path(checkpoint_dir), options.keep_checkpoints))
        self.trainer.add_callback(self.monitor)
        # TRL's get_reward calls the RM's backbone with the truncated responses: watch them there.
        backbone = getattr(reward_model, reward_model.base_model_prefix)
        self._hook = backbone.register_forward_pre_hook(self.monitor.observe_reward_input, with_kwargs=True)
        log(
            f"PPO: {len(self.prompts)} prompts, {options.num_updates} updates of {options.per_device_train_batch_size}, "
            f"device {self.device} ({dtype_note}), RM read at EOS checked "
            f"({self.reading['trained']:.3f} == {self.reading['ppo']:.3f})"
        )

    def _replace_dataloader(self, dataset) -> None:
        """Swap TRL's shuffled DataLoader for one whose order depends only on (seed, update)."""
        import torch
        from torch.utils.data import DataLoader
        from transformers import DataCollatorWithPadding

        self.trainer.dataloader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            # A private generator: starting the iterator draws a base seed, which must not move the
            # global torch RNG (a resumed run starts its iterator at another update than a fresh one).
            generator=torch.Generator().manual_seed(self.options.seed),
        )

    def _quiet_trl(self) -> None:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for callback in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(callback)

    def train(self) -> dict[str, Any]:
        started = time.time()
        self.trainer.train()
        history = self.monitor.history()
        return {
            "updates": history,
            "final": history[-1] if history else {},
            "total_updates": self.options.num_updates,
            "resumed_from_step": self.monitor.resumed_from,
            "warnings": [h["warning"] for h in history if h.get("warning")],
            "runtime_s": round(time.time() - started, 2),
            "device": self.device,
            "num_prompts": len(self.prompts),
            "reward_reading": self.reading,
        }

    def save_policy(self, output_dir: Path) -> Path:
        """Save the trained policy (LoRA merged) and the tokenizer as a plain HF folder."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model).policy
        if self.options.lora.enabled:
            import copy

            policy = copy.deepcopy(policy).merge_and_unload()
        policy.save_pretrained(output_dir)
        self.tokenizer.padding_side = self.saved_padding_side
        try:
            self.tokenizer.save_pretrained(output_dir)
        finally:
            self.tokenizer.padding_side = "left"
        return output_dir

    def close(self) -> None:
        self._hook.remove()


class _RunCallback(TrainerCallback):
    """Resumes at train begin, watches the rollouts, logs each update and writes checkpoints."""

    def __init__(self, run: PPORun, store: CheckpointStore):
        self.run = run
        self.store = store
        self.resumed_from: int | None = None
        self.pending: list[tuple[int, bool]] = []  # (content length, has EOS) of the current rollout

    # -- observation of the rollout, through the reward model's input
    def observe_reward_input(self, module, args, kwargs) -> None:
        input_ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        context = self._context_length()
        responses, live = input_ids[:, context:], mask[:, context:].bool()
        eos = self.run.tokenizer.eos_token_id
        has_eos = ((responses == eos) & live).any(dim=1)
        lengths = live.sum(dim=1) - has_eos.long()  # tokens before the EOS
        self.pending.extend(zip(lengths.tolist(), has_eos.tolist()))

    def _context_length(self) -> int:
        # Queries of a batch are left-padded to the longest one; the response starts after that.
        step = self.run.trainer.state.global_step  # updates done so far = 0-based index of this one
        return max(self.run.query_lengths[i] for i in self.run.batches.batch(step))

    # -- TrainerCallback hooks
    def on_train_begin(self, args, state, control, **kwargs):
        run, trainer = self.run, self.run.trainer
        latest = self.store.latest()
        if latest is None:
            from transformers import set_seed

            set_seed(run.options.seed)
            return control
        saved, meta = self.store.load(latest)
        expected = self._meta(0)
        if meta["fingerprint"] != expected["fingerprint"]:
            changed = sorted(
                k for k in expected["fingerprint"] if meta["fingerprint"].get(k) != expected["fingerprint"][k]
            )
            raise PPOError(
                f"{latest}: this checkpoint was written by a run with other settings or prompts "
                f"({', '.join(changed)}); use another checkpoint folder or delete it to start afresh"
            )
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.policy.load_state_dict(saved["policy"])
        model.value_model.load_state_dict(saved["value"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.lr_scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state.global_step = saved["global_step"]
        state.episode = saved["episode"]
        state.log_history = saved["log_history"]
        # TRL's loop always counts from 1 to num_total_batches; run only the updates left.
        args.num_total_batches = run.options.num_updates - state.global_step
        run.batches.start_update = state.global_step
        self.resumed_from = state.global_step
        run.log(f"PPO: resumed from {latest.name} (update {state.global_step} of {run.options.num_updates})")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1]
        if "objective/scores" not in entry:
            return control
        lengths = [n for n, _ in self.pending]
        missing = [not e for _, e in self.pending]
        self.pending = []
        entry["response_length"] = float(np.mean(lengths)) if lengths else float("nan")
        entry["missing_eos_rate"] = float(np.mean(missing)) if missing else float("nan")
        penalty = self.run.options.missing_eos_penalty or 0.0
        entry["rm_score"] = entry["objective/scores"] + penalty * entry["missing_eos_rate"]
        watched = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg")
        broken = [key for key in watched if key in entry and not math.isfinite(entry[key])]
        if broken:
            raise PPODiverged(
                f"PPO update {state.global_step}: {', '.join(broken)} became NaN or infinite; lower learning_rate "
                "or check the reward model (the last checkpoint holds the state before this)"
            )
        warning = length_warning(self.history(), self.run.options.length_monitor_window,
                                 self.run.options.length_growth_warning)
        window = self.run.options.length_monitor_window
        recent = [h.get("warning") for h in self.history()[-window:-1]]
        if warning and not any(recent):  # once per window, not on every update
            entry["warning"] = warning
            self.run.log(f"PPO WARNING: {warning}")
        self.run.log(
            f"PPO update {state.global_step}/{self.run.options.num_updates}: score {entry['objective/scores']:.3f} "
            f"kl {entry['objective/kl']:.3f} len {entry['response_length']:.1f} "
            f"no-eos {entry['missing_eos_rate']:.2f} lr {entry['lr']:.2e}"
        )
        return control

    def on_step_end(self, args, state, control, **kwargs):
        every = self.run.options.checkpoint_every
        if state.global_step % every == 0 or state.global_step == self.run.options.num_updates:
            trainer = self.run.trainer
            model = trainer.accelerator.unwrap_model(trainer.model)
            saved = {
                "policy": model.policy.state_dict(),
                "value": model.value_model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.lr_scheduler.state_dict(),
                "rng": rng_state(),
                "global_step": state.global_step,
                "episode": state.episode,
                "log_history": state.log_history,
            }
            path = self.store.save(state.global_step, saved, self._meta(state.global_step))
            self.run.log(f"PPO: checkpoint {path.name}")
        return control

    def _meta(self, step: int) -> dict[str, Any]:
        prompts_hash = hashlib.sha256("\x00".join(self.run.prompts).encode()).hexdigest()
        return {
            "step": step,
            "fingerprint": {**self.run.options.fingerprint(), "prompts_sha256": prompts_hash},
        }

    def history(self) -> list[dict[str, Any]]:
        """Per-update metrics under our names."""
        out = []
        for entry in self.run.trainer.state.log_history:
            if "objective/scores" not in entry:
                continue
            row = {"update": entry["step"]}
            row.update({ours: entry[theirs] for theirs, ours in LOG_KEYS.items() if theirs in entry})
            for key in ("response_length", "missing_eos_rate", "rm_score", "warning"):
                if key in entry:
                    row[key] = entry[key]
            out.append(row)
        return out


def train_ppo(
    policy_dir: Path,
    reward_dir: Path,
    prompts_path: Path,
    output_dir: Path,
    options: PPOOptions,
    checkpoint_dir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run PPO (resuming from `checkpoint_dir` when it holds a checkpoint) and save the policy to `output_dir`.

    Returns the per-update log (`updates`: score, rm_score, kl, response_length, missing_eos_rate, ...),
    the `final` values, `warnings` of the length monitor, `resumed_from_step` and the runtime.
    """
    prompts = load_prompts(Path(prompts_path))
    run = PPORun(policy_dir, reward_dir, prompts, options, Path(checkpoint_dir), log)
    try:
        metrics = run.train()
        run.save_policy(Path(output_dir))
    finally:
        run.close()
    shutil.rmtree(Path(checkpoint_dir) / "trl-scratch", ignore_errors=True)
    final = metrics["final"]
    if final:
        log(
            f"PPO done in {metrics['runtime_s']:.0f}s: score {final['score']:.3f}, kl {final['kl']:.3f}, "
            f"response length {final['response_length']:.1f}, missing EOS {final['missing_eos_rate']:.2f}"
        )
    return metrics
