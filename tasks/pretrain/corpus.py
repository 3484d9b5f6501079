"""Corpus input: read documents from text, Markdown, JSONL, JSON and Parquet files.

`read_corpus(["data/*.jsonl", "notes.md"])` expands the paths and globs, reads every file by its
suffix and returns one `Document` per text, remembering the file and the line (text formats) or
row (JSON lists, Parquet) it came from. Any bad input fails at once with a `CorpusError` that names
the file, the line or row, and the field, so nothing downstream runs on half a corpus.

Formats:
- `.txt`, `.md`: documents are separated by one or more blank lines.
- `.jsonl`: one JSON object a line, the text under `text_field`; blank lines are skipped.
- `.json`: a list of objects, the text under `text_field`.
- `.parquet`: a string column named `text_field`.

A directory stands for every supported file below it. Try it:

    python -c "from tasks.pretrain.corpus import read_corpus; print(read_corpus(['README.md'])[:2])"
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")

_GLOB_CHARS = re.compile(r"[*?\[]")
# A line holding only whitespace separates two documents in a text file.
_BLANK_LINE = re.compile(r"^[ \t\f\v]*$")


class CorpusError(ValueError):
    """A corpus source is missing, unreadable or malformed; the message says where."""


@dataclass(frozen=True)
class Document:
    """One text of the corpus and where it came from.

    `line` is the 1-based line where the text starts (txt, md, jsonl); `row` is the 0-based
    position in a JSON list or a Parquet file. The other one is None.
    """

    text: str
    source: str
    line: int | None = None
    row: int | None = None

    @property
    def location(self) -> str:
        """`file:line` or `file row N`, for messages."""
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.row is not None:
            return f"{self.source} row {self.row}"
        return self.source


def read_corpus(sources: Sequence[str], text_field: str = "text") -> list[Document]:
    """Read every document of `sources` (paths, directories or globs), in order.

    Globs expand in sorted order; a glob that matches nothing, a missing file, an unsupported
    suffix, a malformed record or a missing/non-string text field raises `CorpusError`.
    """
    if isinstance(sources, (str, Path)):
        # A lone string would otherwise be read character by character.
        sources = [str(sources)]
    if not sources:
        raise CorpusError("no corpus sources given")
    if not text_field:
        raise CorpusError("text_field must be a non-empty field name")
    documents: list[Document] = []
    for path in expand_sources(sources):
        documents.extend(read_file(path, text_field))
    return documents


def expand_sources(sources: Sequence[str]) -> list[Path]:
    """Turn paths, directories and globs into the list of files to read, in a stable order."""
    files: list[Path] = []
    for source in sources:
        source = str(source)
        if _GLOB_CHARS.search(source):
            matches = sorted(glob.glob(str(Path(source).expanduser()), recursive=True))
            matches = [m for m in matches if Path(m).is_file()]
            if not matches:
                raise CorpusError(f"corpus glob {source!r} matches no files")
            files.extend(Path(m) for m in matches)
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise CorpusError(
                    f"corpus directory {source!r} holds no files with a supported suffix "
                    f"({', '.join(SUPPORTED_SUFFIXES)})"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise CorpusError(f"corpus file {source!r} does not exist")
    return files


def read_file(path: Path, text_field: str = "text") -> list[Document]:
    """Read one corpus file, choosing the format by its suffix."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".json":
        return _read_json(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    raise CorpusError(
        f"{path}: unsupported corpus file suffix {path.suffix or '(none)'!r}; "
        f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read corpus file: {exc.strerror or exc}") from exc


def _decode(path: Path, data: bytes) -> str:
    """Decode UTF-8 (a leading BOM is allowed); a bad byte is reported with its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CorpusError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from exc


def _read_text(path: Path) -> list[Document]:
    text = _decode(path, _read_bytes(path))
    documents: list[Document] = []
    paragraph: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if _BLANK_LINE.match(line):
            if paragraph:
                documents.append(Document("\n".join(paragraph).strip(), str(path), line=start))
                paragraph = []
            continue
        if not paragraph:
            start = number
        paragraph.append(line.rstrip())
    if paragraph:
        documents.append(Document("\n".join(paragraph).strip(), str(path), line=start))
    return documents


def _text_of(record: Any, text_field: str, where: str) -> str:
    """The text field of one JSON record, or a CorpusError naming where it failed."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        available = ", ".join(sorted(map(str, record))) or "none"
        raise CorpusError(f"{where}: missing field {text_field!r} (fields present: {available})")
    value = record[text_field]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise CorpusError(f"{where}: field {text_field!r} must be a string, got {kind}")
    return value


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    text = _decode(path, _read_bytes(path))
    documents: list[Document] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
        value = _text_of(record, text_field, f"{path}:{number}")
        documents.append(Document(value, str(path), line=number))
    return documents


def _read_json(path: Path, text_field: str) -> list[Document]:
    text = _decode(path, _read_bytes(path))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(records, list):
        raise CorpusError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    return [
        Document(_text_of(record, text_field, f"{path} item {index}"), str(path), row=index)
        for index, record in enumerate(records)
    ]


def _read_parquet(path: Path, text_field: str) -> list[Document]:
    # Imported here so that reading text corpora does not pay for pyarrow.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read corpus file: {exc.strerror or exc}") from exc
    except pa.ArrowException as exc:
        raise CorpusError(f"{path}: not a readable Parquet file: {exc}") from exc
    if text_field not in schema.names:
        available = ", ".join(schema.names) or "none"
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {available})")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise CorpusError(f"{path}: column {text_field!r} must hold strings, but its type is {column_type}")
    try:
        values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except pa.ArrowException as exc:
        raise CorpusError(f"{path}: cannot read column {text_field!r}: {exc}") from exc
    documents: list[Document] = []
    for index, value in enumerate(values):
        if value is None:
            raise CorpusError(f"{path} row {index}: column {text_field!r} is null")
        documents.append(Document(value, str(path), row=index))
    return documents
