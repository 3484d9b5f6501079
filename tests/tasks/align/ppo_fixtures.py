"""Tiny, self-contained SFT policy and reward model for the PPO and evaluation tests.

Not a conftest (the align conftest belongs to the SFT/RM tests); the test modules load this file by
path. Everything is built from scratch on a templated toy task, with plain torch loops (seconds on
one CPU thread):

- prompts: "Describe the {topic}." and three other templates over 40 topics; a fixed hash split
  keeps 25% of the prompts out of every training step (the held-out prompts);
- SFT answers: "The {topic} is {adjective}." and, for every prompt, the same answer with an
  unwanted filler ("um um") in it, so the SFT policy says "um" about half the time;
- the reward model (initialised from the SFT weights) learns from (clean, filler) pairs that the
  filler is bad. The filler rate, counted on the text, is then a metric independent of the RM score.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

TOPICS = [
    "cat", "dog", "river", "mountain", "apple", "car", "house", "tree", "bird", "book",
    "cloud", "garden", "lamp", "bridge", "ocean", "forest", "train", "window", "chair", "clock",
    "flower", "horse", "island", "kettle", "lemon", "moon", "needle", "orange", "piano", "rabbit",
    "road", "ship", "table", "tiger", "violin", "wagon", "yacht", "zebra", "candle", "desert",
]
ADJECTIVES = ["red", "big", "quiet", "old", "bright", "small", "warm", "fast", "green", "soft"]
TEMPLATES = ["Describe the {t}.", "Tell me about the {t}.", "What is the {t} like?", "Say something about the {t}."]
FILLER = "um um"
FILLER_RE = re.compile(r"\bum\b")


def clean_answer(topic: str) -> str:
    adjective = ADJECTIVES[TOPICS.index(topic) % len(ADJECTIVES)]
    return f"The {topic} is {adjective}."


def filler_answer(topic: str) -> str:
    adjective = ADJECTIVES[TOPICS.index(topic) % len(ADJECTIVES)]
    return f"The {topic} is {FILLER} {adjective}."


def has_filler(text: str) -> bool:
    return FILLER_RE.search(text) is not None


def _is_held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] < 64  # about 25%


@dataclass(frozen=True)
class ToyTask:
    train: list[tuple[str, str]]  # (prompt, topic)
    held_out: list[tuple[str, str]]


def toy_task() -> ToyTask:
    rows = [(template.format(t=topic), topic) for topic in TOPICS for template in TEMPLATES]
    return ToyTask(
        train=[row for row in rows if not _is_held_out(row[0])],
        held_out=[row for row in rows if _is_held_out(row[0])],
    )


@dataclass(frozen=True)
class AlignFixtures:
    root: Path
    base_dir: Path  # random init, same tokenizer
    sft_dir: Path
    rm_dir: Path
    train_prompts_path: Path  # Parquet with a `prompt` column
    held_out_prompts: list[str]
    held_out_references: list[str]
    rm_held_out_accuracy: float


def _chat_ids(tokenizer, prompt: str, answer: str | None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def _pad_right(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _train_sft(model, tokenizer, task: ToyTask, steps: int, seed: int) -> None:
    import torch

    examples = []
    for prompt, topic in task.train:
        for answer in (clean_answer(topic), filler_answer(topic)):
            full = _chat_ids(tokenizer, prompt, answer)
            prompt_len = len(_chat_ids(tokenizer, prompt, None))
            examples.append((full, prompt_len))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, 16)
        ids, mask = _pad_right([full for full, _ in batch], tokenizer.pad_token_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for i, (_, prompt_len) in enumerate(batch):
            labels[i, :prompt_len] = -100  # loss on the answer and its EOS only
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _rm_scores(model, tokenizer, rows: list[list[int]]):
    ids, mask = _pad_right(rows, tokenizer.pad_token_id)
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def _train_rm(model, tokenizer, task: ToyTask, steps: int, seed: int) -> float:
    """Bradley-Terry on (clean, filler) pairs; returns pairwise accuracy on the held-out prompts."""
    import torch

    def pairs(rows):
        return [
            (_chat_ids(tokenizer, prompt, clean_answer(topic)), _chat_ids(tokenizer, prompt, filler_answer(topic)))
            for prompt, topic in rows
        ]

    train_pairs, held_out_pairs = pairs(task.train), pairs(task.held_out)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(train_pairs, 16)
        chosen = _rm_scores(model, tokenizer, [c for c, _ in batch])
        rejected = _rm_scores(model, tokenizer, [r for _, r in batch])
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        chosen = _rm_scores(model, tokenizer, [c for c, _ in held_out_pairs])
        rejected = _rm_scores(model, tokenizer, [r for _, r in held_out_pairs])
    return float((chosen > rejected).float().mean())


def build_align_fixtures(root: Path, sft_steps: int = 300, rm_steps: int = 150, preset: str = "tiny") -> AlignFixtures:
    """Build (or reuse, when `root` already holds them) the base, SFT and RM folders (bench/ppo.py: other presets)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tasks.pretrain.model import build_model
    from tasks.pretrain.tokenizer import train_tokenizer

    task = toy_task()
    done = root / "done.json"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        texts = [prompt + " " + clean_answer(topic) + " " + filler_answer(topic) for prompt, topic in task.train + task.held_out]
        tokenizer = train_tokenizer(texts * 4, vocab_size=400, min_frequency=1)
        base = build_model(preset, tokenizer, max_positions=128, seed=0)
        for name, model in (("base", base),):
            tokenizer.save_pretrained(root / name)
            model.save_pretrained(root / name)

        torch.manual_seed(0)
        sft = AutoModelForCausalLM.from_pretrained(root / "base")
        _train_sft(sft, tokenizer, task, steps=sft_steps, seed=0)
        tokenizer.save_pretrained(root / "sft")
        sft.save_pretrained(root / "sft")

        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_pretrained(root / "sft", num_labels=1)
        rm.config.pad_token_id = tokenizer.pad_token_id
        accuracy = _train_rm(rm, tokenizer, task, steps=rm_steps, seed=0)
        tokenizer.save_pretrained(root / "rm")
        rm.save_pretrained(root / "rm")

        pq.write_table(pa.table({"prompt": [prompt for prompt, _ in task.train]}), root / "train_prompts.parquet")
        done.write_text(json.dumps({"rm_held_out_accuracy": accuracy}))
    accuracy = json.loads(done.read_text())["rm_held_out_accuracy"]
    return AlignFixtures(
        root=root,
        base_dir=root / "base",
        sft_dir=root / "sft",
        rm_dir=root / "rm",
        train_prompts_path=root / "train_prompts.parquet",
        held_out_prompts=[prompt for prompt, _ in task.held_out],
        held_out_references=[clean_answer(topic) for _, topic in task.held_out],
        rm_held_out_accuracy=accuracy,
    )
