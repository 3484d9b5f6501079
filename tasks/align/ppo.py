"""PPO for the align stage: the SFT policy learns from the reward model, on a KL leash to the SFT model.

Our own PPO on plain torch over transformers models, the InstructGPT recipe (Ouyang et al. 2022;
details as in Ziegler et al. 2019 and Huang et al. 2024, "The N+ implementation details of RLHF"):

    metrics = train_ppo(sft_dir, rm_dir, Path("prompts.parquet"), out_dir, PPOOptions(total_updates=30),
                        checkpoint_dir=work_dir)

One update, top to bottom in `PPORun.run_update`:
1. rollout: a batch of chat-templated prompts, answers sampled with the policy's `generate`; an
   answer ends at its first EOS (the EOS is part of it);
2. scoring: the reward model (a sequence classifier trained on the templated exchange, read at its
   last token) is read at that EOS; answers without EOS lose `missing_eos_penalty`;
3. per-token reward: -kl_coef * (log p_policy - log p_ref) at every answer token (the reference is
   the frozen SFT model), plus the score at the last token;
4. advantages: GAE(gamma, lam) over the value model's predictions (the value model starts as a
   copy of the RM), whitened over the batch;
5. optimisation: `num_ppo_epochs` passes over shuffled minibatches with the clipped policy loss and
   the clipped value loss; the KL coefficient is fixed or adapted to a target KL.

Exact resume: every `checkpoint_every` updates one file holds policy, value model, optimizer,
scheduler, KL coefficient, every RNG (python, numpy, torch) and the update counter and history,
written atomically. The prompt batches depend only on (seed, update). A run killed at any time
and restarted ends bit-identical to an uninterrupted one (on the same device; some GPU kernels are
not deterministic).

Run it (the align flow's `ppo` stage calls the same function):

    .venv/bin/python -c "from pathlib import Path; from tasks.align.ppo import PPOOptions, train_ppo; \
        train_ppo(Path('sft'), Path('rm'), Path('prompts.parquet'), Path('ppo'), PPOOptions(), Path('ppo-ckpt'))"

Processes: the policy and value model train as one module through `accelerate` (DDP: gradients
averaged across processes, each process samples its own prompts). Put that call in a script and
start it with `torchrun --standalone --nproc_per_node 2 script.py` or `accelerate launch
--num_processes 2 script.py` (add `--cpu` / gloo on a machine without GPUs). Devices: on a GPU fp32
weights with bf16 autocast; on a CPU plain fp32. LoRA (on the policy only):
`PPOOptions(lora=LoraOptions(enabled=True))`; the reference is then the policy with its adapters off.

Inputs, checkpoints and the length monitor are in `tasks.align.ppo_io`.
Tests: `OMP_NUM_THREADS=1 pytest tests/tasks/align/test_ppo.py tests/tasks/align/test_ppo_io.py`
(the `slow` ones train tiny models built from scratch). Speed: `python bench/ppo.py`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from tasks.align.config import LoraOptions
from tasks.align.ppo_io import (  # noqa: F401  (re-exported: the names other modules import from here)
    CheckpointStore,
    PPODiverged,
    PPOError,
    PromptBatches,
    chat_full_ids,
    chat_query_ids,
    check_tokenizer,
    length_warning,
    load_prompts,
    rng_state,
    set_rng_state,
)

DEFAULT_UPDATES = 30
# Options that may change between a killed run and its resume without changing the result.
RESUME_NEUTRAL_FIELDS = {"checkpoint_every", "keep_checkpoints", "length_monitor_window", "length_growth_warning"}


class PPOOptions(BaseModel):
    """PPO settings. The defaults are the ones measured to give a clear, seed-stable gain on tiny models."""

    total_updates: int | None = Field(
        None,
        ge=1,
        description=f"PPO updates (rollout batches) to run; each samples per_device_train_batch_size prompts "
        f"per process. Set this or total_episodes; neither: {DEFAULT_UPDATES} updates.",
    )
    total_episodes: int | None = Field(
        None,
        ge=1,
        description="Alternative to total_updates, in sampled responses of one process: "
        "updates = ceil(total_episodes / per_device_train_batch_size).",
    )
    per_device_train_batch_size: int = Field(
        32, ge=2, description="Prompts sampled per update and process (the rollout batch)."
    )
    num_mini_batches: int = Field(
        2, ge=1, description="Minibatches each rollout batch is split into; one optimizer step per minibatch."
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches each minibatch is split into, their gradients summed before the one "
        "optimizer step (less memory, the same step).",
    )
    num_ppo_epochs: int = Field(4, ge=1, description="Passes of PPO gradient steps over each rollout batch.")
    learning_rate: float = Field(
        5e-5, gt=0.0, description="AdamW learning rate, decayed linearly to 0 over the run."
    )
    max_grad_norm: float | None = Field(
        None, gt=0.0, description="Clip the gradient norm of each optimizer step to this; empty: no clipping."
    )
    kl_coef: float = Field(
        0.05, ge=0.0, description="Weight of the per-token KL penalty to the frozen SFT model (the start value "
        "when kl_control is adaptive)."
    )
    kl_control: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="fixed: kl_coef stays as set; adaptive: kl_coef is steered so that the KL per response "
        "approaches kl_target (Ziegler et al. 2019).",
    )
    kl_target: float = Field(
        1.0, gt=0.0, description="Adaptive KL control: the KL (nats per response) to steer towards."
    )
    kl_horizon: int = Field(
        10_000, ge=1, description="Adaptive KL control: responses over which kl_coef may change by about e-fold."
    )
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
    stop_token: Literal["eos"] = Field(
        "eos", description="Token that ends a response: its first EOS (the RM is read there). The only choice."
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

    @model_validator(mode="after")
    def _consistent(self) -> "PPOOptions":
        if self.total_updates is not None and self.total_episodes is not None:
            raise ValueError("set total_updates or total_episodes, not both")
        if self.per_device_train_batch_size % self.num_mini_batches:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} must be a multiple of "
                f"num_mini_batches={self.num_mini_batches}"
            )
        if (self.per_device_train_batch_size // self.num_mini_batches) % self.gradient_accumulation_steps:
            raise ValueError(
                f"the minibatch ({self.per_device_train_batch_size // self.num_mini_batches} responses) must be a "
                f"multiple of gradient_accumulation_steps={self.gradient_accumulation_steps}"
            )
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
# Reading the models. A batch is laid out as [query, left-padded | response, right-padded]: every
# response starts in the same column, and the model sees each row as if it were unpadded because
# padding is masked and positions count real tokens only.


def pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[Any, Any]:
    """Left-padded ids and attention mask of token rows."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask):
    """0, 1, 2, ... over the real tokens of each row (padding gets 0), as if the row were unpadded."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def token_values(model, ids, mask):
    """A sequence classifier's scalar head at every position: [batch, length].

    AutoModelForSequenceClassification reads its head at the last non-pad token; applying the same
    head to the backbone's hidden states at every position gives the value model's per-token values
    and lets the RM be read at any chosen token (the EOS ending the answer).
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return model.score(hidden.last_hidden_state).squeeze(-1).float()


def score_at(model, ids, mask, index):
    """The reward model's score of each row, read at column `index[row]`."""
    import torch

    values = token_values(model, ids, mask)
    return values[torch.arange(ids.shape[0], device=ids.device), index]


def check_reward_reading(reward_model, tokenizer, prompt: str, response: str = "Yes.") -> dict[str, float]:
    """Check that PPO reads the RM at the token RM training read it: the EOS ending the answer.

    RM training scores the templated exchange at its last token. PPO scores the left-padded query
    plus the sampled answer (cut after its first EOS, right-padded) at that EOS. Both must be the
    same token with the same score; a chat template that puts anything after the assistant's EOS
    (e.g. a newline) breaks that and PPO would optimise a different number.
    """
    import torch

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
        trained = reward_model(input_ids=torch.tensor([full], device=device)).logits[0, 0].float().item()
        # As in a PPO batch: the query left-padded, the answer right-padded, read at its EOS.
        row = [pad, pad] + full + [pad, pad]
        ids = torch.tensor([row], device=device)
        mask = torch.tensor([[0, 0] + [1] * len(full) + [0, 0]], device=device)
        read = score_at(reward_model, ids, mask, torch.tensor([1 + len(full)], device=device))[0].item()
    if not math.isclose(trained, read, rel_tol=1e-3, abs_tol=1e-3):
        raise PPOError(
            f"the reward model scores the same exchange {trained:.4f} as in training but {read:.4f} as PPO reads "
            "it; check the RM config's pad_token_id and that the template ends the answer with EOS"
        )
    return {"trained": trained, "ppo": read}


# ---------------------------------------------------------------------------------------------------
# The algorithm's pieces, each a plain function of tensors (unit-tested one by one)


def end_responses(responses, eos_id: int, pad_id: int):
    """Cut each sampled response after its first EOS.

    Returns (responses with pad after the end, valid mask, has_eos). The EOS itself stays: the RM is
    read there and the policy must learn to emit it. A sampled pad also ends a response (before it),
    since pads are masked out of every forward pass.
    """
    import torch

    stop = (responses == eos_id) | (responses == pad_id)
    width = responses.shape[1]
    columns = torch.arange(width, device=responses.device)
    first = torch.where(stop, columns, width).min(dim=1).values  # first stop token, or width
    has_eos = (first < width) & (responses.gather(1, first.clamp(max=width - 1).unsqueeze(1)).squeeze(1) == eos_id)
    lengths = first + has_eos.long()  # the EOS counts, a pad does not
    valid = columns.unsqueeze(0) < lengths.unsqueeze(1)
    return responses.masked_fill(~valid, pad_id), valid, has_eos


def logprobs_of(logits, tokens, temperature: float):
    """log p(token) under softmax(logits / temperature): the distribution the rollout sampled from."""
    import torch

    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def kl_penalty(logprobs, ref_logprobs, estimator: str):
    """Per-token KL estimate from samples of the policy (http://joschu.net/blog/kl-approx.html)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return (-log_ratio).exp() - 1 + log_ratio  # k3: always >= 0, lower variance


def masked_mean(x, mask, reduce: Callable | None = None):
    """Mean of x over mask; `reduce` sums across processes so that every process gets the global mean."""
    total, count = (x * mask).sum(), mask.sum().to(x.dtype)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean: bool = True, reduce: Callable | None = None):
    """(x - mean) / std over the masked entries (of all processes); padding comes out 0."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce)
    whitened = (x - mean) * (var + 1e-8).rsqrt()
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over response tokens; returns (advantages, returns).

    Rewards and values past the end of a response are zero, so the last real token bootstraps from
    nothing (the episode ends there) and padding gets zero advantage.
    """
    import torch

    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, options: PPOOptions):
    """The clipped policy loss and the clipped value loss (PPO, Schulman et al. 2017), averaged over tokens."""
    import torch

    mask = mask.float()
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    # Pessimistic bound: a ratio pushed beyond 1 +- cliprange earns nothing more.
    policy_terms = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - options.cliprange, 1 + options.cliprange))
    policy_loss = masked_mean(policy_terms, mask)
    # The value model may not move more than cliprange_value from its rollout-time prediction either.
    clipped = torch.clamp(new_values, old_values - options.cliprange_value, old_values + options.cliprange_value)
    value_terms = torch.max((new_values - returns) ** 2, (clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_terms, mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(((ratio - 1).abs() > options.cliprange).float(), mask),
            "value_clip_fraction": masked_mean(((new_values - old_values).abs() > options.cliprange_value).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return policy_loss, value_loss, stats


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019), steered towards kl_target.

    Adaptive: the coefficient grows when the measured KL is above target and shrinks below it, by at
    most 20% of (batch / horizon) per update, so one noisy batch cannot swing it.
    """

    def __init__(self, options: PPOOptions):
        self.value = options.kl_coef
        self.adaptive = options.kl_control == "adaptive"
        self.target, self.horizon = options.kl_target, options.kl_horizon

    def update(self, kl: float, responses: int) -> None:
        if self.adaptive:
            error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.value *= 1 + error * responses / self.horizon


@dataclass
class Rollout:
    """One batch of sampled responses with everything PPO needs from the time they were sampled."""

    ids: Any  # [B, Q + R] query (left-padded) + response (right-padded)
    mask: Any  # [B, Q + R] 1 on real tokens
    responses: Any  # [B, R]
    valid: Any  # [B, R] the response tokens, EOS included
    has_eos: Any  # [B]
    logprobs: Any  # [B, R] of the policy that sampled them
    ref_logprobs: Any  # [B, R] of the frozen reference
    values: Any  # [B, R] of the value model
    rm_scores: Any  # [B] the RM's score, read at the last response token
    scores: Any  # [B] rm_scores minus the missing-EOS penalty
    kl: Any  # [B, R] per-token KL estimate
    rewards: Any  # [B, R] -kl_coef * kl, plus the score at the last token
    advantages: Any = None
    returns: Any = None

    def rows(self, index) -> "Rollout":
        """The rollout of the rows `index`, trimmed to their own widest response (less compute)."""
        fields = {k: v[index] for k, v in self.__dict__.items()}
        width = max(int(fields["valid"].sum(1).max()), 1)
        cut = fields["responses"].shape[1] - width
        for name in ("responses", "valid", "logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
            fields[name] = fields[name][:, :width]
        if cut:
            fields["ids"], fields["mask"] = fields["ids"][:, :-cut], fields["mask"][:, :-cut]
        return Rollout(**fields)


# ---------------------------------------------------------------------------------------------------
# The models


def response_logits(model, ids, mask, response_width: int):
    """A causal LM's logits predicting each of the last `response_width` tokens: [B, R, V]."""
    # logits_to_keep: the LM head runs on the response positions only, not on the prompt. Position
    # t-1 predicts token t, so the last position (predicting past the response) is dropped.
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                logits_to_keep=response_width + 1, use_cache=False)
    return out.logits[:, :-1]


def policy_and_value(policy, value_model):
    """Policy and value model as one torch Module: one DDP wrapper syncs the gradients of both.

    Its forward returns the logits predicting each response token and the value before it.
    (Built in a function because this module imports torch only when training starts.)
    """
    import torch

    class PolicyAndValue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.policy = policy
            self.value_model = value_model

        def forward(self, ids, mask, response_width: int):
            # The value of the state before response token t sits where the logits predicting t do.
            values = token_values(self.value_model, ids, mask)[:, -response_width - 1 : -1]
            return response_logits(self.policy, ids, mask, response_width), values

    return PolicyAndValue()


@contextlib.contextmanager
def plain_sampling(policy, config):
    """Generate with `config` alone: `generate` fills unset fields from the model folder's generation
    defaults (top-k, repetition penalty, ...), which would make the sampled distribution differ from
    the softmax(logits / temperature) whose log-probs PPO computes."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


def load_tokenizer(policy_dir: Path, reward_dir: Path):
    """The policy's tokenizer, checked, and checked equal to the RM's (PPO hands token ids to the RM)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    check_tokenizer(tokenizer, policy_dir)
    if (reward_dir / "tokenizer_config.json").is_file():
        if AutoTokenizer.from_pretrained(reward_dir).get_vocab() != tokenizer.get_vocab():
            raise PPOError(
                f"{reward_dir}: the reward model's tokenizer differs from the policy's ({policy_dir}); "
                "PPO hands the policy's token ids to the RM, so both must share one tokenizer"
            )
    return tokenizer


def prepare_prompts(tokenizer, prompts: list[str], max_length: int, log) -> tuple[list[str], list[list[int]]]:
    """Chat-templated query ids; prompts longer than max_length are left out (truncating breaks the template)."""
    query_ids = [chat_query_ids(tokenizer, p) for p in prompts]
    keep = [i for i, ids in enumerate(query_ids) if len(ids) <= max_length]
    if len(keep) < len(prompts):
        log(f"PPO: left out {len(prompts) - len(keep)} prompts longer than {max_length} tokens")
    return [prompts[i] for i in keep], [query_ids[i] for i in keep]


def load_models(policy_dir: Path, reward_dir: Path, tokenizer, options: PPOOptions):
    """(policy, reference or None with LoRA, reward model, value model), all fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for folder, what in ((policy_dir, "policy (SFT)"), (reward_dir, "reward model")):
        if not (folder / "config.json").is_file():
            raise PPOError(f"{folder}: no {what} model folder here (config.json missing)")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = None
    if options.lora.enabled:
        from peft import get_peft_model

        # With adapters the reference is the policy with its adapters off: no second copy in memory.
        policy = get_peft_model(policy, options.lora.peft_config("CAUSAL_LM"))
    else:
        reference = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        reference.eval().requires_grad_(False)
    # The value model starts as the RM: it already knows which answers score well.
    reward_model, value_model = (
        AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32)
        for _ in range(2)
    )
    reward_model.eval().requires_grad_(False)
    for model in (reward_model, value_model):
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise PPOError(f"{reward_dir}: the reward model has no `score` head; PPO reads it at chosen tokens")
    return policy, reference, reward_model, value_model


def check_positions(policy, query_ids: list[list[int]], response_length: int) -> None:
    max_positions = getattr(policy.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids in query_ids)
    if max_positions is not None and longest + response_length > max_positions:
        raise PPOError(
            f"the longest prompt ({longest} tokens) plus response_length ({response_length}) exceeds the model's "
            f"{max_positions} positions; lower max_prompt_length or response_length"
        )


def autocast_context():
    """bf16 autocast on a GPU that has it (fp32 weights stay the master copy), nothing on a CPU."""
    import torch

    from tasks.align.devices import gpu_available

    if gpu_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# The run


class PPORun:
    """One PPO run: loads the models, resumes from the latest checkpoint, trains, saves the policy."""

    def __init__(
        self,
        policy_dir: Path,
        reward_dir: Path,
        prompts: list[str],
        options: PPOOptions,
        checkpoint_dir: Path,
        log: Callable[[str], None] = print,
    ):
        from accelerate import Accelerator
        from transformers import set_seed

        from tasks.align.devices import gpu_available

        self.options = options
        self.accelerator = Accelerator(cpu=not gpu_available())
        self.log = log if self.accelerator.is_main_process else (lambda _: None)  # one log, not one per process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        set_seed(options.seed)  # anything initialised while building (LoRA adapters) is seeded

        self.tokenizer = load_tokenizer(Path(policy_dir), Path(reward_dir))
        self.prompts, self.query_ids = prepare_prompts(self.tokenizer, prompts, options.max_prompt_length, self.log)
        # One batch of B * processes prompts per update; process r takes the r-th slice.
        self.batches = PromptBatches(len(self.prompts), options.per_device_train_batch_size * self.world, options.seed)

        policy, self.reference, self.reward_model, value_model = load_models(
            Path(policy_dir), Path(reward_dir), self.tokenizer, options
        )
        check_positions(policy, self.query_ids, options.response_length)
        self.reading = check_reward_reading(self.reward_model, self.tokenizer, self.prompts[0])
        self._prepare_training(policy, value_model)

        self.store = CheckpointStore(Path(checkpoint_dir), options.keep_checkpoints)
        self.kl = KLController(options)
        self.history: list[dict[str, Any]] = []
        self.done = 0  # updates finished
        self.resumed_from: int | None = None
        self.timing = {"generation_s": 0.0, "scoring_s": 0.0, "training_s": 0.0, "checkpoint_s": 0.0,
                       "rollout_tokens": 0, "training_tokens": 0, "checkpoints": 0}
        if not self._resume():
            set_seed(options.seed + self.rank)  # each process samples differently
        self.log(
            f"PPO: {len(self.prompts)} prompts, {options.num_updates} updates of {options.per_device_train_batch_size}"
            f" x {self.world} process(es), device {self.accelerator.device}, RM read at EOS checked "
            f"({self.reading['trained']:.3f} == {self.reading['ppo']:.3f})"
        )

    def _prepare_training(self, policy, value_model) -> None:
        """Policy + value model as one (DDP-wrapped) module, AdamW over both, linear LR decay."""
        import torch

        device = self.accelerator.device
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.to(device)
        self.model = self.accelerator.prepare(policy_and_value(policy, value_model))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.options.learning_rate)
        # Stepped once per update (not per minibatch), so the schedule does not depend on the minibatching.
        total = self.options.num_updates
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda update: 1 - update / total)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # -- checkpoints

    def _meta(self) -> dict[str, Any]:
        prompts_hash = hashlib.sha256("\x00".join(self.prompts).encode()).hexdigest()
        return {"fingerprint": {**self.options.fingerprint(), "prompts_sha256": prompts_hash}, "processes": self.world}

    def _save_checkpoint(self) -> Path:
        from accelerate.utils import gather_object

        began = time.perf_counter()
        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        path = self.store.path(self.done)
        if self.accelerator.is_main_process:
            state = {
                "policy": self.unwrapped.policy.state_dict(),
                "value": self.unwrapped.value_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_coef": self.kl.value,
                "rng": rngs,  # one per process
                "update": self.done,
                "history": self.history,
            }
            path = self.store.save_in_background(self.done, state, {**self._meta(), "update": self.done})
        self.accelerator.wait_for_everyone()
        self.timing["checkpoint_s"] += time.perf_counter() - began  # what training waited for
        self.timing["checkpoints"] += 1
        return path

    def _resume(self) -> bool:
        latest = self.store.latest()
        if latest is None:
            return False
        state, meta = self.store.load(latest)
        expected = self._meta()
        if meta["fingerprint"] != expected["fingerprint"]:
            changed = sorted(k for k in expected["fingerprint"] if meta["fingerprint"].get(k) != expected["fingerprint"][k])
            raise PPOError(
                f"{latest}: this checkpoint was written by a run with other settings or prompts "
                f"({', '.join(changed)}); use another checkpoint folder or delete it to start afresh"
            )
        if meta["processes"] != self.world:
            raise PPOError(f"{latest}: written by {meta['processes']} process(es), resumed with {self.world}")
        self.unwrapped.policy.load_state_dict(state["policy"])
        self.unwrapped.value_model.load_state_dict(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl.value = state["kl_coef"]
        set_rng_state(state["rng"][self.rank])
        self.done = self.resumed_from = state["update"]
        self.history = state["history"]
        self.log(f"PPO: resumed from {latest.name} (update {self.done} of {self.options.num_updates})")
        return True

    # -- one update

    def _sync(self) -> None:
        import torch

        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    def _reduce_sum(self, x):
        return self.accelerator.reduce(x, "sum") if self.world > 1 else x

    def rollout(self, update: int) -> Rollout:
        """Sample responses for this update's prompts and score them (no gradients)."""
        import torch
        from transformers import GenerationConfig

        options, tokenizer, device = self.options, self.tokenizer, self.accelerator.device
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        size = options.per_device_train_batch_size
        batch = self.batches.batch(update)[self.rank * size : (self.rank + 1) * size]
        query, query_mask = pad_left([self.query_ids[i] for i in batch], pad, device)
        model = self.unwrapped
        model.eval()

        began = time.perf_counter()
        # Pure sampling at `temperature` (no top-k/top-p): the logprobs below are of exactly this distribution.
        generation = GenerationConfig(
            max_new_tokens=options.response_length, do_sample=True, temperature=options.temperature,
            top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad,
        )
        with torch.no_grad(), autocast_context(), plain_sampling(model.policy, generation):
            out = model.policy.generate(input_ids=query, attention_mask=query_mask, generation_config=generation)
        self._sync()
        self.timing["generation_s"] += time.perf_counter() - began

        began = time.perf_counter()
        responses, valid, has_eos = end_responses(out[:, query.shape[1] :], eos, pad)
        lengths = valid.sum(1)
        width = max(int(lengths.max()), 1)  # columns after the longest response are all padding
        responses, valid = responses[:, :width], valid[:, :width]
        ids = torch.cat([query, responses], 1)
        mask = torch.cat([query_mask, valid.long()], 1)
        with torch.no_grad(), autocast_context():
            logits, values = model(ids, mask, width)
            logprobs = logprobs_of(logits, responses, options.temperature)
            del logits
            # With LoRA the reference is the policy with its adapters switched off.
            off = model.policy.disable_adapter() if self.reference is None else contextlib.nullcontext()
            with off:
                ref_logits = response_logits(self.reference or model.policy, ids, mask, width)
            ref_logprobs = logprobs_of(ref_logits, responses, options.temperature)
            del ref_logits
            # The RM at the last response token (the EOS), or at the last query token for an empty response.
            last = query.shape[1] + lengths - 1
            rm_scores = score_at(self.reward_model, ids, mask, last)

        valid_f = valid.float()
        scores = rm_scores.clone()
        if options.missing_eos_penalty is not None:
            scores = scores - options.missing_eos_penalty * (~has_eos).float()
        kl = kl_penalty(logprobs, ref_logprobs, options.kl_estimator) * valid_f
        rewards = -self.kl.value * kl
        has_tokens = lengths > 0
        rows = torch.arange(len(batch), device=device)[has_tokens]
        rewards[rows, (lengths - 1)[has_tokens]] += scores[has_tokens]
        if options.whiten_rewards:
            rewards = masked_whiten(rewards, valid, shift_mean=False, reduce=self._reduce_sum)
        rollout = Rollout(ids, mask, responses, valid, has_eos, logprobs * valid_f, ref_logprobs * valid_f,
                          values * valid_f, rm_scores, scores, kl, rewards)
        advantages, rollout.returns = gae(rewards, rollout.values, valid, options.gamma, options.lam)
        # Whitened over the whole batch (all processes): the step size does not depend on the reward scale.
        rollout.advantages = masked_whiten(advantages, valid, reduce=self._reduce_sum)
        self._sync()
        self.timing["scoring_s"] += time.perf_counter() - began
        self.timing["rollout_tokens"] += int(lengths.sum())
        return rollout

    def optimize(self, rollout: Rollout, update: int) -> dict[str, float]:
        """num_ppo_epochs passes over shuffled minibatches; one optimizer step per minibatch."""
        import torch

        options = self.options
        size = options.per_device_train_batch_size
        minibatch = size // options.num_mini_batches
        micro = minibatch // options.gradient_accumulation_steps
        stats: dict[str, list] = {}
        began = time.perf_counter()
        self.model.train()
        # Its own generator per (seed, update, process): the shuffles need no saved state.
        shuffle = np.random.default_rng([options.seed, update, self.rank])
        for _ in range(options.num_ppo_epochs):
            order = shuffle.permutation(size)
            for start in range(0, size, minibatch):
                parts = [order[i : i + micro] for i in range(start, start + minibatch, micro)]
                for k, part in enumerate(parts):
                    mb = rollout.rows(torch.as_tensor(part, device=rollout.ids.device))
                    # Gradients are averaged across processes on the last micro-batch only.
                    sync = contextlib.nullcontext() if k == len(parts) - 1 else self.accelerator.no_sync(self.model)
                    with sync:
                        with autocast_context():
                            logits, values = self.model(mb.ids, mb.mask, mb.responses.shape[1])
                        new_logprobs = logprobs_of(logits, mb.responses, options.temperature)
                        policy_loss, value_loss, step_stats = ppo_losses(
                            new_logprobs, mb.logprobs, mb.advantages, values.float(), mb.values, mb.returns, mb.valid,
                            options,
                        )
                        # Micro-batch losses are averaged: their summed gradients are the minibatch's.
                        loss = (policy_loss + options.vf_coef * value_loss) / len(parts)
                        self.accelerator.backward(loss)
                    with torch.no_grad():
                        logp = torch.log_softmax(logits.float() / options.temperature, dim=-1)
                        step_stats["entropy"] = masked_mean(-(logp.exp() * logp).sum(-1), mb.valid.float())
                    step_stats.update(policy_loss=policy_loss.detach(), value_loss=value_loss.detach())
                    for key, value in step_stats.items():
                        stats.setdefault(key, []).append(value)
                    self.timing["training_tokens"] += int(mb.mask.sum())
                if options.max_grad_norm is not None:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), options.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        self.timing["training_s"] += time.perf_counter() - began
        return {key: float(self._mean_across(torch.stack(values).mean())) for key, values in stats.items()}

    def _mean_across(self, x):
        return self.accelerator.reduce(x, "mean") if self.world > 1 else x

    def run_update(self, update: int) -> dict[str, Any]:
        options = self.options
        learning_rate = self.scheduler.get_last_lr()[0]
        kl_coef = self.kl.value
        rollout = self.rollout(update)
        train_stats = self.optimize(rollout, update)
        self.scheduler.step()

        valid = rollout.valid.float()
        per_response = {
            "score": rollout.scores,
            "rm_score": rollout.rm_scores,
            "kl": rollout.kl.sum(1),
            "non_score_reward": (-kl_coef * rollout.kl).sum(1),
            "response_length": valid.sum(1) - rollout.has_eos.float(),  # tokens before the EOS
            "missing_eos_rate": (~rollout.has_eos).float(),
        }
        means = {k: float(self._mean_across(v.float().mean())) for k, v in per_response.items()}
        row = {"update": update + 1, **means, "rlhf_reward": means["score"] + means["non_score_reward"],
               **train_stats, "kl_coef": kl_coef, "learning_rate": learning_rate,
               "episode": (update + 1) * options.per_device_train_batch_size * self.world}
        broken = [k for k in ("score", "kl", "policy_loss", "value_loss") if not math.isfinite(row[k])]
        if broken:
            raise PPODiverged(
                f"PPO update {update + 1}: {', '.join(broken)} became NaN or infinite; lower learning_rate "
                "or check the reward model (the last checkpoint holds the state before this)"
            )
        self.kl.update(row["kl"], options.per_device_train_batch_size * self.world)
        return row

    def train(self) -> dict[str, Any]:
        started = time.time()
        try:
            self._train_loop()
        finally:
            self.store.wait()  # the last checkpoint is on disk before we return (or fail)
        self.timing["checkpoint_write_s"] = self.store.write_seconds
        history = self.history
        return {
            "updates": history,
            "final": history[-1] if history else {},
            "total_updates": self.options.num_updates,
            "resumed_from_step": self.resumed_from,
            "warnings": [h["warning"] for h in history if h.get("warning")],
            "runtime_s": round(time.time() - started, 2),
            "timing": dict(self.timing),
            "device": str(self.accelerator.device),
            "num_processes": self.world,
            "num_prompts": len(self.prompts),
            "reward_reading": self.reading,
        }

    def _train_loop(self) -> None:
        options = self.options
        for update in range(self.done, options.num_updates):
            row = self.run_update(update)
            self.history.append(row)
            warning = length_warning(self.history, options.length_monitor_window, options.length_growth_warning)
            recent = [h.get("warning") for h in self.history[-options.length_monitor_window : -1]]
            if warning and not any(recent):  # once per window, not on every update
                row["warning"] = warning
                self.log(f"PPO WARNING: {warning}")
            self.log(
                f"PPO update {row['update']}/{options.num_updates}: score {row['score']:.3f} kl {row['kl']:.3f} "
                f"len {row['response_length']:.1f} no-eos {row['missing_eos_rate']:.2f} "
                f"lr {row['learning_rate']:.2e} kl_coef {row['kl_coef']:.3f}"
            )
            self.done = update + 1
            if self.done % options.checkpoint_every == 0 or self.done == options.num_updates:
                path = self._save_checkpoint()
                self.log(f"PPO: checkpoint {path.name}")

    def save_policy(self, output_dir: Path) -> Path:
        """Save the trained policy (LoRA merged) and the tokenizer as a plain HF folder (main process)."""
        output_dir = Path(output_dir)
        if self.accelerator.is_main_process:
            policy = self.unwrapped.policy
            if self.options.lora.enabled:
                policy = copy.deepcopy(policy).merge_and_unload()
            output_dir.mkdir(parents=True, exist_ok=True)
            policy.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir


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

    Returns the per-update log (`updates`: update, score, rm_score, kl, kl_coef, response_length,
    missing_eos_rate, policy_loss, value_loss, clip_fraction, entropy, ...), the `final` values,
    `warnings` of the length monitor, `resumed_from_step`, the runtime and `timing` (seconds spent in
    generation, scoring, training and checkpoints, and token counts).
    """
    prompts = load_prompts(Path(prompts_path))
    run = PPORun(policy_dir, reward_dir, prompts, options, Path(checkpoint_dir), log)
    metrics = run.train()
    run.save_policy(Path(output_dir))
    final = metrics["final"]
    if final:
        run.log(
            f"PPO done in {metrics['runtime_s']:.0f}s: score {final['score']:.3f}, kl {final['kl']:.3f}, "
            f"response length {final['response_length']:.1f}, missing EOS {final['missing_eos_rate']:.2f}"
        )
    return metrics
