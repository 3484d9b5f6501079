"""Next-token pretraining of a decoder-only LM: a plain PyTorch loop that checkpoints and resumes.

The corpus arrives as one flat stream of token ids (each document wrapped in BOS ... EOS). Training
batches are random windows of that stream drawn from an RNG seeded by (seed, step), so a run that
resumes from step k draws exactly the batches an uninterrupted run would have drawn. The held-out
stream is scored on fixed windows, the same ones at every evaluation.

    python -m tasks.pretrain.training   # not a CLI: run `alignflow pretrain` (flows/pretrain.py)
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from storage import atomic

CHECKPOINT = "checkpoint.pt"


class TrainingOptions(BaseModel):
    """How the base model is built and trained."""

    preset: Literal["tiny", "mini", "small", "base"] = Field("mini", description="Model size preset: tiny (CPU tests), mini (the CPU demo), small (CPU, tens of minutes), base (~110M, GPU).")
    init_from: str | None = Field(None, description="Continue from this local HF checkpoint folder or registry model ref instead of a fresh preset (its tokenizer is reused).")
    vocab_size: int = Field(2048, ge=300, le=200_000, description="BPE vocabulary size, special tokens included.")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per training window (also the model's context length).")
    batch_size: int = Field(8, ge=1, description="Windows per optimizer step on the CPU; doubled on a GPU.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps in total.")
    learning_rate: float = Field(3e-3, gt=0, lt=1, description="Peak AdamW learning rate (after warmup; cosine decay to 10%).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    eval_every: int = Field(200, ge=1, description="Steps between held-out evaluations.")
    eval_windows: int = Field(64, ge=1, description="Held-out windows scored at each evaluation.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints (a re-run with the same parameters resumes from the last).")
    holdout_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of documents held out for perplexity.")
    seed: int = Field(0, description="Seed for initialisation, the held-out split and batch order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU (bf16) when one is present.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainingOptions":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})")
        return self


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no GPU is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def tokenize_documents(texts: list[str], tokenizer) -> np.ndarray:
    """One flat stream: BOS doc EOS BOS doc EOS ..."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int32)


def split_holdout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic document-level split; at least one document on each side."""
    if len(texts) < 2:
        raise ValueError(f"need at least 2 documents to hold one out, got {len(texts)}")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_hold = min(len(texts) - 1, max(1, round(len(texts) * fraction)))
    hold = set(order[:n_hold].tolist())
    return [t for i, t in enumerate(texts) if i not in hold], [t for i, t in enumerate(texts) if i in hold]


def batch_windows(stream: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training batch of `step`: random windows of seq_len+1 tokens, a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
    return np.stack([stream[s : s + seq_len + 1] for s in starts])


def eval_windows(stream: np.ndarray, seq_len: int, limit: int) -> np.ndarray:
    """Fixed, non-overlapping held-out windows (the tail padded by wrapping around)."""
    needed = seq_len + 1
    if len(stream) < needed:
        stream = np.resize(stream, needed)
    count = max(1, min(limit, len(stream) // needed))
    return np.stack([stream[i * needed : (i + 1) * needed] for i in range(count)])


def lr_at(step: int, options: TrainingOptions) -> float:
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.max_steps - options.warmup_steps)
    return options.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def heldout_loss(model, windows: np.ndarray, device: str, batch_size: int) -> float:
    """Mean next-token cross-entropy over the held-out windows (nats per token)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = torch.as_tensor(windows[i : i + batch_size], dtype=torch.long, device=device)
            with _autocast(device):
                logits = model(input_ids=chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += chunk[:, 1:].numel()
    model.train()
    return total / count


def _autocast(device: str):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def _optimizer(model, options: TrainingOptions):
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=options.learning_rate, betas=(0.9, 0.95),
    )


def _save_checkpoint(path: Path, model, optimizer, step: int, history: dict) -> None:
    import torch

    with atomic.atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history}, tmp)


def pretrain(
    model,
    train_stream: np.ndarray,
    heldout_stream: np.ndarray,
    options: TrainingOptions,
    checkpoint_dir: Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `model` in place for options.max_steps, resuming from checkpoint_dir when it holds one.

    Returns the history: train losses, held-out losses (the first one before any training),
    tokens per second of this process's steps, and the step it resumed from (0 for a fresh run).
    """
    import torch

    device = pick_device(options.device)
    batch_size = options.batch_size * (2 if device == "cuda" else 1)
    if len(train_stream) < options.seq_len + 2:
        raise ValueError(f"the training corpus has {len(train_stream)} tokens, fewer than one window of seq_len={options.seq_len}")
    model.to(device)
    model.train()
    optimizer = _optimizer(model, options)
    windows = eval_windows(heldout_stream, options.seq_len, options.eval_windows)
    history: dict = {"train": [], "heldout": [], "resumed_from": 0}
    start = 0
    checkpoint = checkpoint_dir / CHECKPOINT
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        history["resumed_from"] = start
        log(f"resumed from checkpoint at step {start} ({checkpoint})")
    else:
        history["heldout"].append((0, heldout_loss(model, windows, device, batch_size)))
        log(f"step 0: held-out loss {history['heldout'][-1][1]:.4f}")

    tokens, began = 0, time.perf_counter()
    for step in range(start, options.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, options)
        batch = torch.as_tensor(batch_windows(train_stream, options.seq_len, batch_size, options.seed, step), dtype=torch.long, device=device)
        with _autocast(device):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: the loss became {loss.item()} at step {step + 1}; lower learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        tokens += batch[:, 1:].numel()
        done = step + 1
        history["train"].append((done, loss.item()))
        if done % options.eval_every == 0 or done == options.max_steps:
            history["heldout"].append((done, heldout_loss(model, windows, device, batch_size)))
            log(f"step {done}/{options.max_steps}: train loss {loss.item():.4f}, held-out loss {history['heldout'][-1][1]:.4f}")
        if done % options.checkpoint_every == 0 or done == options.max_steps:
            _save_checkpoint(checkpoint, model, optimizer, done, history)
    elapsed = time.perf_counter() - began
    history["tokens_per_second"] = tokens / elapsed if tokens else None
    history["device"] = device
    return history
