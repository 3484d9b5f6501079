"""Load the human-written seed tasks that start a Self-Instruct run.

Accepted formats (picked from the file's suffix and its first non-blank character):

- Self-Instruct JSONL, one task a line:
  `{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}`.
  Only `instruction` and `instances` are required; unknown fields are ignored.
- Alpaca JSON: one JSON list of `{"instruction", "input", "output"}`; each item becomes a task with
  one instance.
- JSONL or Parquet with the Alpaca columns `instruction, input, output` (one task with one instance
  a line or row). A JSONL line or Parquet row that has an `instances` field is read as a
  Self-Instruct task instead, so both layouts may be mixed.

Tasks without an `id` get `seed_task_{i}` (`i` = the task's 0-based position in the file).
Files are read by `storage.reader` (a UTF-8 byte-order mark is accepted). Every problem raises
`SeedFormatError` (an `InputError`), whose message names the file, the line (1-based; "row" for
entries of a JSON list, with the line they start on, and for Parquet rows) and the field:
`seeds.jsonl: line 3: field 'instruction': missing`.

    from tasks.self_instruct.seeds import load_seed_tasks, demo_seed_path
    tasks = load_seed_tasks(demo_seed_path("en"))

Run its tests with `pytest tests/tasks/self_instruct/test_seeds.py`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import InputError
from storage.reader import PARQUET_SUFFIXES, json_type, read_records

_DEMO_DIR = Path(__file__).parent / "demo"


class Instance(BaseModel):
    """One input/output example of a task. An empty input means the task needs none."""

    model_config = ConfigDict(frozen=True)

    input: str = Field(default="", description="The task's input; empty when the task needs none.")
    output: str = Field(description="The expected output for that input.")


class SeedTask(BaseModel):
    """A seed task: an instruction with a few instances."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Unique id of the task in its seed file (generated when absent).")
    name: str | None = Field(default=None, description="Optional short human-readable name.")
    instruction: str = Field(description="The task's instruction, as a human would write it.")
    instances: list[Instance] = Field(description="At least one input/output example.")
    is_classification: bool = Field(
        default=False, description="True when the output is one of a small, fixed set of labels."
    )


class SeedFormatError(InputError):
    """A seed file that cannot be read; the message names the file, the line or row, and the field."""


def demo_seed_path(language: str = "en") -> Path:
    """Path of the project's demo seed set for `language` ("en" or "ko")."""
    path = _DEMO_DIR / f"seeds_{language}.jsonl"
    if not path.is_file():
        raise ValueError(f"no demo seed set for language {language!r}; available: en, ko")
    return path


def seed_file_sha256(path: str | Path) -> str:
    """Hex sha256 of the seed file's bytes, for the dataset manifest."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise SeedFormatError(path, "no such file") from None
    return digest.hexdigest()


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Read the seed tasks of `path` (format detected from suffix and content; see module doc).

    Raises `SeedFormatError` for a missing or empty file, non-UTF-8 bytes, malformed JSON, a task
    without instruction or instances, wrong field types and duplicate ids.
    """
    path = Path(path)
    # Seed files are JSON whatever their suffix (a list, or one task a line), unless Parquet.
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    records = read_records(path, format="parquet" if parquet else "json", required=["instruction"] if parquet else (),
                           error=SeedFormatError)
    tasks: list[SeedTask] = []
    first_seen: dict[str, str] = {}
    for index, (where, record) in enumerate(records):
        location = str(where)
        if parquet and index == 0 and "instances" not in record and "output" not in record:
            raise SeedFormatError(path, "missing column (or an 'instances' column)", field="output")
        task = _task_from_record(path, location, record, index)
        if task.id in first_seen:
            raise SeedFormatError(path, f"duplicate seed id {task.id!r}, first used on {first_seen[task.id]}",
                                  where=location, field="id")
        first_seen[task.id] = location
        tasks.append(task)
    if not tasks:
        raise SeedFormatError(path, "the seed file contains no seed tasks")
    return tasks


_type_name = json_type


def _error(path: Path, location: str, field: str | None, problem: str) -> SeedFormatError:
    return SeedFormatError(path, problem, where=location, field=field or None)


def _string(path: Path, location: str, field: str, value: Any, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise _error(path, location, field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _error(path, location, field, "is empty")
    return value


def _instance(path: Path, location: str, value: Any, prefix: str) -> Instance:
    """One instance from `value`; `prefix` ("instances[0]." or "" for Alpaca) names its fields."""
    if not isinstance(value, dict):
        raise _error(path, location, prefix.rstrip("."),
                              f"expected an object, got {_type_name(value)}")
    input_value = value.get("input")
    # A missing or null input means "no input", which is how Alpaca writes input-free tasks.
    text_input = "" if input_value is None else _string(
        path, location, f"{prefix}input", input_value, allow_empty=True)
    if value.get("output") is None:
        raise _error(path, location, f"{prefix}output", "missing")
    output = _string(path, location, f"{prefix}output", value["output"], allow_empty=False)
    return Instance(input=text_input, output=output)


def _task_from_record(path: Path, location: str, record: Any, index: int) -> SeedTask:
    if not isinstance(record, dict):
        raise _error(path, location, None, f"expected a JSON object, got {_type_name(record)}")
    if record.get("instruction") is None:
        raise _error(path, location, "instruction", "missing")
    instruction = _string(path, location, "instruction", record["instruction"], allow_empty=False)

    instances_value = record.get("instances")
    # Parquet files that mix both layouts hold a null `instances` on Alpaca rows.
    if instances_value is not None:
        if not isinstance(instances_value, list):
            raise _error(
                path, location, "instances", f"expected a list, got {_type_name(instances_value)}")
        if not instances_value:
            raise _error(path, location, "instances", "is empty; a task needs at least one")
        instances = [_instance(path, location, item, f"instances[{i}].")
                     for i, item in enumerate(instances_value)]
    elif "output" in record:
        instances = [_instance(path, location, record, "")]
    else:
        raise _error(path, location, "instances", "missing (and no Alpaca 'output' field)")

    task_id = record.get("id")
    if task_id is None:
        task_id = f"seed_task_{index}"
    else:
        task_id = _string(path, location, "id", task_id, allow_empty=False)
    name = record.get("name")
    if name is not None:
        name = _string(path, location, "name", name, allow_empty=True)
    is_classification = record.get("is_classification")
    if is_classification is None:
        is_classification = False
    elif not isinstance(is_classification, bool):
        raise _error(path, location, "is_classification",
                              f"expected true or false, got {_type_name(is_classification)}")
    return SeedTask(id=task_id, name=name, instruction=instruction, instances=instances,
                    is_classification=is_classification)
