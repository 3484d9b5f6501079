"""Fixtures for the align tests: a small learnable instruction dataset, a tiny base model, an SFT model.

The dataset is this project's own, generated here from templates (no third-party data): ~150 prompts
whose answers follow fixed patterns ("Repeat the word three times: apple" -> "apple apple apple"),
so a tiny model learns them in a few hundred CPU steps and held-out prompts of the same templates
measure that learning.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

_ALIGN_TMP = Path(tempfile.mkdtemp(prefix="alignflow-align-tests-"))
atexit.register(shutil.rmtree, _ALIGN_TMP, ignore_errors=True)

WORDS = [
    "apple", "river", "stone", "cloud", "garden", "window", "candle", "forest", "bridge", "pencil",
    "mirror", "basket", "rocket", "island", "ladder", "button", "castle", "tiger", "violin", "wallet",
    "planet", "summer", "winter", "silver", "anchor", "jacket", "meadow", "harbor", "feather", "lantern",
    "marble", "orange", "puzzle", "saddle", "thunder", "valley", "wizard", "yellow", "zipper", "copper",
]
NAMES = [
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Iris", "Jonas",
    "Karin", "Leo", "Maria", "Nils", "Olga", "Paul", "Quinn", "Rosa", "Sven", "Tina",
    "Uma", "Victor", "Wanda", "Xaver", "Yara", "Zoe", "Arne", "Bea", "Carl", "Dora",
]
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
    ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Russia", "Moscow"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("old", "new"),
    ("happy", "sad"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("open", "closed"),
    ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("near", "far"),
]
# Additions a reward model should learn to dislike (the "unwanted addition" preference signal).
UNWANTED = ["Buy now and save big!", "Click here to subscribe today!"]


def instruction_rows() -> list[dict[str, str]]:
    """About 150 (prompt, completion) pairs from fixed templates; deterministic."""
    rows = []
    for word in WORDS:
        rows.append({"prompt": f"Repeat the word three times: {word}", "completion": f"{word} {word} {word}"})
    for name in NAMES:
        rows.append({"prompt": f"Say hello to {name}.", "completion": f"Hello, {name}! Nice to meet you."})
    for country, city in CAPITALS:
        rows.append({"prompt": f"What is the capital of {country}?", "completion": f"The capital of {country} is {city}."})
    for a, b in OPPOSITES:
        rows.append({"prompt": f"What is the opposite of {a}?", "completion": f"The opposite of {a} is {b}."})
    for word in WORDS[:30]:
        rows.append({"prompt": f"Give the plural of {word}.", "completion": f"The plural of {word} is {word}s."})
    for n in range(2, 10):
        rows.append({"prompt": f"Count from 1 to {n}.", "completion": ", ".join(str(i) for i in range(1, n + 1))})
    return rows


@pytest.fixture(scope="session")
def instruction_data() -> dict[str, Path]:
    """The dataset as Parquet: all rows, and a fixed train / held-out split (eval_fraction 0.2, seed 0)."""
    from tasks.align.data import load_sft_table, split_train_eval

    folder = _ALIGN_TMP / "data"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(instruction_rows()), folder / "sft.parquet")
    train, held_out = split_train_eval(load_sft_table(folder / "sft.parquet"), eval_fraction=0.2, seed=0)
    pq.write_table(train, folder / "train.parquet")
    pq.write_table(held_out, folder / "eval.parquet")
    return {"all": folder / "sft.parquet", "train": folder / "train.parquet", "eval": folder / "eval.parquet"}


@pytest.fixture(scope="session")
def align_base_dir(instruction_data) -> Path:
    """A random-init 0.9M-parameter Llama with the project tokenizer trained on the dataset's own texts.

    Its tokens fit the data (unlike the generic 400-token fixture) and it is twice as wide and deep
    as the "tiny" preset, so SFT's gains show in 200 CPU steps (~15 s).
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    from tasks.pretrain.tokenizer import train_tokenizer

    folder = _ALIGN_TMP / "base"
    if not (folder / "config.json").exists():
        texts = [f"{r['prompt']}\n{r['completion']}" for r in instruction_rows()] + UNWANTED
        tokenizer = train_tokenizer(texts, vocab_size=600, min_frequency=2)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=256, hidden_size=128, intermediate_size=384,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
    return folder


SFT_STEPS = 200


@pytest.fixture(scope="session")
def sft_run(align_base_dir, instruction_data) -> dict:
    """One SFT run of the base model, shared by the SFT, preference and reward tests."""
    from tasks.align.config import SFTOptions
    from tasks.align.sft import train_sft

    out = _ALIGN_TMP / "sft-model"
    lines: list[str] = []
    metrics = train_sft(
        align_base_dir,
        instruction_data["train"],
        instruction_data["eval"],
        out,
        SFTOptions(max_steps=SFT_STEPS, learning_rate=2e-3, per_device_train_batch_size=8, eval_steps=100, seed=0),
        _ALIGN_TMP / "sft-checkpoints",
        log=lines.append,
    )
    return {"model_dir": out, "metrics": metrics, "log": lines}


@pytest.fixture(scope="session")
def sft_model_dir(sft_run) -> Path:
    return sft_run["model_dir"]


def unwanted_addition_pairs(rows: list[dict[str, str]]) -> pa.Table:
    """Two pairs per prompt: the reference (chosen) vs the reference plus an unwanted addition (rejected)."""
    out = []
    for row in rows:
        for extra in UNWANTED:
            out.append(
                {
                    "prompt": row["prompt"],
                    "chosen": row["completion"],
                    "rejected": f"{row['completion']} {extra}",
                    "judge": "file",
                    "chosen_score": 1.0,
                    "rejected_score": 0.0,
                }
            )
    return pa.Table.from_pylist(out)


@pytest.fixture(scope="session")
def unwanted_preferences(instruction_data) -> dict[str, Path]:
    """Preference Parquet files (train / held-out prompts) with the unwanted-addition signal."""
    folder = _ALIGN_TMP / "prefs-unwanted"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "eval"):
        rows = pq.read_table(instruction_data[split]).select(["prompt", "completion"]).to_pylist()
        paths[split] = folder / f"{split}.parquet"
        pq.write_table(unwanted_addition_pairs(rows), paths[split])
    return paths


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for a child Python that imports the project (same thread and offline settings)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
