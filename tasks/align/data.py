"""Instruction data for the align stage: load, validate, split, and convert to TRL's formats.

Accepted input (a Parquet file, or a folder holding one):
- `prompt, completion` string columns (the self-instruct "sft view"), or
- `messages`: a chat list of `{role, content}` ending with the assistant's answer.
When both are present, `prompt, completion` win (they hold the same data).

Every loader returns the same normalized table: `prompt` (str, the text the split hashes),
`completion` (str), `prompt_messages` (the chat before the answer, as TRL reads it).

    table = load_sft_table("data/self-instruct@3/")
    parts = split_three_ways(table, validation_fraction=0.1, test_fraction=0.15, seed=0)
    dataset = to_prompt_completion_dataset(train)    # for trl.SFTTrainer
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.errors import AlignflowError

ROLES = ("system", "user", "assistant")
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("completion", pa.string()), ("prompt_messages", pa.list_(MESSAGE_TYPE))]
)
# Preferred file names when a folder holds several tables (the self-instruct dataset holds
# instructions, instances and rejected tables beside the sft view).
PREFERRED_NAMES = ("sft.parquet", "train.parquet")


class DataError(AlignflowError, ValueError):
    """Input data that cannot be used; the message names the file, the row and the field."""


def load_sft_table(path_or_dir: str | Path) -> pa.Table:
    """Read instruction data from a Parquet file or a folder, validate it, return the normalized table."""
    path = Path(path_or_dir)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else _pick_files(path)
    parts = [normalize_sft_table(pq.read_table(file), file) for file in files]
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if table.num_rows == 0:
        raise DataError(f"{path}: the table has no rows")
    return table


def _has_sft_columns(names: list[str]) -> bool:
    return {"prompt", "completion"} <= set(names) or "messages" in names


def _pick_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: the folder holds no .parquet file")
    schemas = {file: pq.read_schema(file).names for file in files}
    for name in PREFERRED_NAMES:
        if (folder / name) in schemas and _has_sft_columns(schemas[folder / name]):
            return [folder / name]
    usable = [file for file in files if _has_sft_columns(schemas[file])]
    if not usable:
        listing = "; ".join(f"{file.name}: {', '.join(cols)}" for file, cols in schemas.items())
        raise DataError(
            f"{folder}: no Parquet file has the columns `prompt, completion` or `messages` (found {listing})"
        )
    # Several usable files are read as shards of one table (train-00000.parquet, train-00001.parquet, ...).
    return usable


def normalize_sft_table(table: pa.Table, source: str | Path = "<table>") -> pa.Table:
    """Validate an in-memory table (prompt/completion or messages) and return the normalized layout."""
    source = Path(source)
    names = table.column_names
    if {"prompt", "completion"} <= set(names):
        return _from_prompt_completion(table, source)
    if "messages" in names:
        return _from_messages(table, source)
    missing = sorted({"prompt", "completion"} - set(names))
    raise DataError(
        f"{source}: missing column(s) {', '.join(missing)} (need `prompt, completion` or `messages`; "
        f"found {', '.join(names) or 'no columns'})"
    )


def _text(value: Any, source: Path, row: int, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row}: field `{field}` must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source}: row {row}: field `{field}` is empty")
    return value


def _from_prompt_completion(table: pa.Table, source: Path) -> pa.Table:
    prompts, completions = table.column("prompt").to_pylist(), table.column("completion").to_pylist()
    rows = {"prompt": [], "completion": [], "prompt_messages": []}
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt = _text(prompt, source, row, "prompt")
        rows["prompt"].append(prompt)
        rows["completion"].append(_text(completion, source, row, "completion"))
        rows["prompt_messages"].append([{"role": "user", "content": prompt}])
    return pa.table(rows, schema=SFT_SCHEMA)


def _from_messages(table: pa.Table, source: Path) -> pa.Table:
    rows = {"prompt": [], "completion": [], "prompt_messages": []}
    for row, messages in enumerate(table.column("messages").to_pylist()):
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{source}: row {row}: field `messages` needs at least a user and an assistant message")
        clean = []
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise DataError(
                    f"{source}: row {row}: field `messages[{turn}].role` is {role!r}; expected one of {', '.join(ROLES)}"
                )
            content = _text(message.get("content"), source, row, f"messages[{turn}].content")
            clean.append({"role": message["role"], "content": content})
        if clean[-1]["role"] != "assistant":
            raise DataError(f"{source}: row {row}: field `messages` must end with an assistant message")
        if not any(m["role"] == "user" for m in clean[:-1]):
            raise DataError(f"{source}: row {row}: field `messages` has no user message before the answer")
        context = clean[:-1]
        # The prompt text is what the split hashes and what judges and samplers show: the user turns.
        rows["prompt"].append("\n".join(m["content"] for m in context if m["role"] == "user"))
        rows["completion"].append(clean[-1]["content"])
        rows["prompt_messages"].append(context)
    return pa.table(rows, schema=SFT_SCHEMA)


def _hash_unit(seed: int, prompt: str) -> float:
    """A number in [0, 1) fixed by (seed, prompt): the same prompt lands on the same side in every table."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_eval(table: pa.Table, eval_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split rows into (train, eval) by a hash of the prompt text; works on any table with a `prompt` column.

    Row order does not matter, duplicates of a prompt stay together (no leakage), and a prompt keeps
    its side when other rows are added, so held-out prompts stay held out across dataset versions.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if "prompt" not in table.column_names:
        raise DataError(f"cannot split: the table has no `prompt` column (found {', '.join(table.column_names)})")
    is_eval = [_hash_unit(seed, prompt) < eval_fraction for prompt in table.column("prompt").to_pylist()]
    mask = pa.array(is_eval, type=pa.bool_())
    train, held_out = table.filter(pc.invert(mask)), table.filter(mask)
    for name, part in (("train", train), ("eval", held_out)):
        if part.num_rows == 0:
            raise DataError(
                f"the {name} split is empty ({table.num_rows} rows, eval_fraction={eval_fraction}, seed={seed}); "
                "use more data or a different eval_fraction"
            )
    return train, held_out


SPLITS = ("train", "validation", "test")


def side_of(prompt: str, validation_fraction: float, test_fraction: float, seed: int) -> str:
    """The split a prompt belongs to: test below `test_fraction` of the hash range, then validation, then train."""
    unit = _hash_unit(seed, prompt)
    return "test" if unit < test_fraction else "validation" if unit < test_fraction + validation_fraction else "train"


def split_three_ways(table: pa.Table, validation_fraction: float, test_fraction: float, seed: int) -> dict[str, pa.Table]:
    """Split rows into train, validation and test by a hash of the prompt text.

    Validation chooses (early stopping, the best checkpoint, a stage's gate threshold never); test only
    reports. The hash puts a prompt in test when it falls below `test_fraction`, so a prompt keeps its
    side when the dataset grows or the validation share changes: test prompts stay unseen.
    """
    if not (0.0 < validation_fraction < 1.0 and 0.0 < test_fraction < 1.0 and validation_fraction + test_fraction < 1.0):
        raise DataError(
            f"validation_fraction ({validation_fraction}) and test_fraction ({test_fraction}) must each be between 0 "
            "and 1 and leave rows for training"
        )
    if "prompt" not in table.column_names:
        raise DataError(f"cannot split: the table has no `prompt` column (found {', '.join(table.column_names)})")
    side = [side_of(prompt, validation_fraction, test_fraction, seed) for prompt in table.column("prompt").to_pylist()]
    parts = {name: table.filter(pa.array([s == name for s in side], type=pa.bool_())) for name in SPLITS}
    for name, part in parts.items():
        if part.num_rows == 0:
            raise DataError(
                f"the {name} split is empty ({table.num_rows} rows, validation_fraction={validation_fraction}, "
                f"test_fraction={test_fraction}, seed={seed}); use more data or larger fractions"
            )
    return parts


def to_prompt_completion_dataset(table: pa.Table):
    """A `datasets.Dataset` in TRL's conversational prompt-completion format.

    SFTTrainer applies the tokenizer's chat template to `prompt + completion` and masks the prompt,
    so the loss covers the answer and the EOS that the template puts after it.
    """
    from datasets import Dataset

    if "prompt_messages" not in table.column_names:
        table = normalize_sft_table(table)
    return Dataset.from_dict(
        {
            "prompt": table.column("prompt_messages").to_pylist(),
            "completion": [[{"role": "assistant", "content": c}] for c in table.column("completion").to_pylist()],
        }
    )
