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
Every problem raises `SeedFormatError`, whose message names the file, the line (1-based; "item" for
entries of a JSON list, "row" for Parquet) and the field.

    from tasks.self_instruct.seeds import load_seed_tasks, demo_seed_path
    tasks = load_seed_tasks(demo_seed_path("en"))

Run its tests with `pytest tests/tasks/self_instruct/test_seeds.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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


class SeedFormatError(ValueError):
    """A seed file that cannot be read; the message names the file, the line or row, and the field."""

    def __init__(self, path: str | Path, location: str | None, field: str | None, problem: str):
        self.path = str(path)
        self.location = location
        self.field = field
        self.problem = problem
        parts = [self.path]
        if location:
            parts.append(location)
        if field:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts) + ": " + problem)


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
        raise SeedFormatError(path, None, None, "seed file not found") from None
    return digest.hexdigest()


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Read the seed tasks of `path` (format detected from suffix and content; see module doc).

    Raises `SeedFormatError` for a missing or empty file, non-UTF-8 bytes, malformed JSON, a task
    without instruction or instances, wrong field types and duplicate ids.
    """
    path = Path(path)
    if not path.is_file():
        raise SeedFormatError(path, None, None, "seed file not found")
    if path.suffix.lower() == ".parquet":
        records = _parquet_records(path)
    else:
        raw = path.read_bytes()
        if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
            raw = raw[3:]
        if raw.lstrip()[:1] == b"[":
            records = _json_list_records(path, raw)
        else:
            records = _jsonl_records(path, raw)

    tasks: list[SeedTask] = []
    first_seen: dict[str, str] = {}
    for index, (location, record) in enumerate(records):
        task = _task_from_record(path, location, record, index)
        if task.id in first_seen:
            raise SeedFormatError(
                path, location, "id",
                f"duplicate seed id {task.id!r}, first used on {first_seen[task.id]}",
            )
        first_seen[task.id] = location
        tasks.append(task)
    if not tasks:
        raise SeedFormatError(path, None, None, "the seed file contains no seed tasks")
    return tasks


def _decode_line(path: Path, raw: bytes, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SeedFormatError(
            path, f"line {line_number}", None,
            f"bytes that are not UTF-8 at column {err.start + 1} ({raw[err.start:err.end]!r})",
        ) from None


def _jsonl_records(path: Path, raw: bytes) -> list[tuple[str, Any]]:
    records = []
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        line = _decode_line(path, raw_line, number).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if _is_one_json_object(raw):
                raise SeedFormatError(
                    path, None, None,
                    "holds one JSON object over several lines; expected one task a line (JSONL) "
                    "or a JSON list of Alpaca records",
                ) from None
            raise SeedFormatError(
                path, f"line {number}", None, f"malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        records.append((f"line {number}", record))
    return records


def _is_one_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _json_list_records(path: Path, raw: bytes) -> list[tuple[str, Any]]:
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        _decode_line(path, raw_line, number)
    text = raw.decode("utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise SeedFormatError(
            path, f"line {err.lineno}", None, f"malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    # Walk the list a second time only to learn the line where each item starts, so that errors
    # about an item can point at it; the text is already known to be valid JSON.
    decoder = json.JSONDecoder()
    starts = []
    position = text.index("[") + 1
    for _ in items:
        while text[position] in " \t\r\n,":
            position += 1
        starts.append(text.count("\n", 0, position) + 1)
        _, position = decoder.raw_decode(text, position)
    return [(f"item {i + 1} (line {line})", item) for i, (item, line) in enumerate(zip(items, starts))]


def _parquet_records(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq  # only needed for Parquet seeds

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise SeedFormatError(path, None, None, f"not a readable Parquet file ({err})") from None
    columns = set(table.column_names)
    if "instruction" not in columns:
        raise SeedFormatError(path, None, "instruction", "missing column")
    if "instances" not in columns and "output" not in columns:
        raise SeedFormatError(path, None, "output", "missing column (or an 'instances' column)")
    return [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _string(path: Path, location: str, field: str, value: Any, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise SeedFormatError(path, location, field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise SeedFormatError(path, location, field, "is empty")
    return value


def _instance(path: Path, location: str, value: Any, prefix: str) -> Instance:
    """One instance from `value`; `prefix` ("instances[0]." or "" for Alpaca) names its fields."""
    if not isinstance(value, dict):
        raise SeedFormatError(path, location, prefix.rstrip("."),
                              f"expected an object, got {_type_name(value)}")
    input_value = value.get("input")
    # A missing or null input means "no input", which is how Alpaca writes input-free tasks.
    text_input = "" if input_value is None else _string(
        path, location, f"{prefix}input", input_value, allow_empty=True)
    if value.get("output") is None:
        raise SeedFormatError(path, location, f"{prefix}output", "missing")
    output = _string(path, location, f"{prefix}output", value["output"], allow_empty=False)
    return Instance(input=text_input, output=output)


def _task_from_record(path: Path, location: str, record: Any, index: int) -> SeedTask:
    if not isinstance(record, dict):
        raise SeedFormatError(path, location, None, f"expected a JSON object, got {_type_name(record)}")
    if record.get("instruction") is None:
        raise SeedFormatError(path, location, "instruction", "missing")
    instruction = _string(path, location, "instruction", record["instruction"], allow_empty=False)

    instances_value = record.get("instances")
    # Parquet files that mix both layouts hold a null `instances` on Alpaca rows.
    if instances_value is not None:
        if not isinstance(instances_value, list):
            raise SeedFormatError(
                path, location, "instances", f"expected a list, got {_type_name(instances_value)}")
        if not instances_value:
            raise SeedFormatError(path, location, "instances", "is empty; a task needs at least one")
        instances = [_instance(path, location, item, f"instances[{i}].")
                     for i, item in enumerate(instances_value)]
    elif "output" in record:
        instances = [_instance(path, location, record, "")]
    else:
        raise SeedFormatError(path, location, "instances", "missing (and no Alpaca 'output' field)")

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
        raise SeedFormatError(path, location, "is_classification",
                              f"expected true or false, got {_type_name(is_classification)}")
    return SeedTask(id=task_id, name=name, instruction=instruction, instances=instances,
                    is_classification=is_classification)
