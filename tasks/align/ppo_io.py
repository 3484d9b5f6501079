"""PPO's inputs and state on disk: prompts, the tokenizer's chat ids, prompt batches, checkpoints.

The algorithm itself is in `tasks.align.ppo`; this module holds what it reads and writes, so that
the algorithm reads top to bottom without file handling in between:

- `load_prompts` / `check_tokenizer` / `chat_query_ids`: validated inputs, clear errors up front;
- `PromptBatches`: the prompts of update s depend only on (seed, s), so a resume needs no sampler state;
- `CheckpointStore`: one file per checkpoint (`ppo-step-000010.pt`), written atomically, optionally
  in a background thread;
- `rng_state` / `set_rng_state`: every RNG a run draws from (python, numpy, torch, CUDA);
- `length_warning`: the response-length monitor (a sign of reward hacking).

Tests: `pytest tests/tasks/align/test_ppo_io.py`.
"""

from __future__ import annotations

import copy
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from storage.errors import AlignflowError

CHECKPOINT_PREFIX = "ppo-step-"
CHECKPOINT_SUFFIX = ".pt"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+){re.escape(CHECKPOINT_SUFFIX)}$")


class PPOError(AlignflowError, ValueError):
    """Bad input to PPO (prompts, models, tokenizer, options, checkpoints); raised before training."""


class PPODiverged(AlignflowError, RuntimeError):
    """Training produced NaN or infinite values; the message names the update."""


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
            f"{where}: pad and EOS are the same token ({tokenizer.eos_token_id}); PPO ends a response at its "
            "first EOS and treats pads as padding, so it could not tell the answer's EOS from padding"
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


# ---------------------------------------------------------------------------------------------------
# Deterministic batches


class PromptBatches:
    """Prompt batches whose batch for update s depends only on (seed, s): a resume needs no sampler state.

    Epoch e is a permutation of the prompts drawn from its own generator seeded with (seed, e); the
    last incomplete batch of an epoch is dropped. Iterating is infinite, from `start_update` on.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        if num_prompts < batch_size:
            raise PPOError(
                f"{num_prompts} usable prompts are fewer than per_device_train_batch_size={batch_size} "
                "(times the number of processes)"
            )
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.start_update = 0

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


# ---------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointStore:
    """Checkpoint files `ppo-step-000010.pt` in one folder, each written complete or not at all.

    One file holds everything a resume needs (weights, optimizer, scheduler, RNGs, step, history)
    plus `meta` (the settings it was made under): a kill can never leave half a checkpoint behind,
    because the file is written under a temporary name and renamed (`storage.atomic.atomic_path`).
    """

    def __init__(self, folder: Path, keep: int):
        self.folder = Path(folder)
        self.keep = keep
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.write_seconds = 0.0  # spent by writers (in the background or not)

    def list(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def path(self, step: int) -> Path:
        return self.folder / f"{CHECKPOINT_PREFIX}{step:06d}{CHECKPOINT_SUFFIX}"

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        import torch

        from storage.atomic import atomic_path

        began = time.perf_counter()
        final = self.path(step)
        with atomic_path(final) as tmp:
            # Plain state dicts through torch.save: no safetensors conversion, no config files.
            torch.save({"meta": meta, "state": state}, tmp)
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        for stale in self.folder.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        self.write_seconds += time.perf_counter() - began
        return final

    def save_in_background(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """`save` in a thread: the caller waits only for a copy of the state, not for the disk.

        Serialising and fsyncing go on while training continues (on a busy disk an fsync alone can
        take seconds). The copy is needed because training keeps changing the tensors in place. A
        kill during the write loses only this checkpoint: the file appears complete or not at all.
        """
        self.wait()  # one write at a time, in order
        snapshot = copy_state(state)

        def write() -> None:
            try:
                self.save(step, snapshot, meta)
            except BaseException as exc:  # handed to the training thread by wait()
                self._failure = exc

        self._writer = threading.Thread(target=write, name=f"ppo-checkpoint-{step}", daemon=True)
        self._writer.start()
        return self.path(step)

    def wait(self) -> None:
        """Wait for a background write to finish; raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise PPOError(f"{self.folder}: writing a checkpoint failed ({failure})") from failure

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        try:
            # weights_only=False: the file holds numpy RNG state and python tuples, written by us.
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise PPOError(f"{path}: not a readable PPO checkpoint ({exc}); delete it to start afresh") from exc
        return saved["state"], saved["meta"]


def copy_state(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are copied to the CPU."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(v) for v in value)
    return copy.deepcopy(value)


def rng_state() -> dict[str, Any]:
    """Every RNG PPO draws from: sampling (torch), shuffles (numpy), anything else (python)."""
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
