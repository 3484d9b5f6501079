"""Corpus input: read documents from text, Markdown, JSONL, JSON and Parquet files.

`read_corpus(["data/*.jsonl", "notes.md"])` expands the paths and globs, reads every file by its
suffix and returns one `Document` per text, remembering the file and the line (text formats) or
row (JSON lists, Parquet) it came from. Files are read by `storage.reader`; any bad input fails at
once with a `CorpusError` (an `InputError`) that names the file, the line or row, and the field, in
the one format `FILE: line N: field 'text': PROBLEM`, so nothing downstream runs on half a corpus.

Formats:
- `.txt`, `.md`: documents are separated by one or more blank lines.
- `.jsonl`, `.json`: one JSON object a line, or a JSON list of objects; the text under
  `text_field`; blank lines are skipped.
- `.parquet`: a string column named `text_field`.

A directory stands for every supported file below it. Try it:

    python -c "from tasks.pretrain.corpus import read_corpus; print(read_corpus(['README.md'])[:2])"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from storage import reader
from storage.errors import InputError
from storage.reader import Location

TEXT_SUFFIXES = reader.TEXT_SUFFIXES
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")

# A line holding only whitespace separates two documents in a text file.
_BLANK_LINE = re.compile(r"^[ \t\f\v]*$")


class CorpusError(InputError):
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
        """`file: line N` or `file: row N` (1-based), as in error messages."""
        if self.line is not None:
            return f"{self.source}: line {self.line}"
        if self.row is not None:
            return f"{self.source}: row {self.row + 1}"
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
        raise CorpusError(None, "no corpus sources given")
    if not text_field:
        raise CorpusError(None, "text_field must be a non-empty field name")
    documents: list[Document] = []
    for path in expand_sources(sources):
        documents.extend(read_file(path, text_field))
    return documents


def expand_sources(sources: Sequence[str]) -> list[Path]:
    """Turn paths, directories and globs into the list of files to read, in a stable order."""
    return reader.expand_sources(sources, SUPPORTED_SUFFIXES, error=CorpusError)


def read_file(path: Path, text_field: str = "text") -> list[Document]:
    """Read one corpus file, choosing the format by its suffix."""
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise CorpusError(path, f"unsupported corpus file suffix {path.suffix or '(none)'!r}; "
                                f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    records = reader.read_records(path, columns=[text_field], required=[text_field], error=CorpusError)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return _paragraphs(path, records)
    documents = []
    for where, record in records:
        text = _text_of(path, where, record, text_field)
        if where.kind == "line":
            documents.append(Document(text, str(path), line=where.number))
        else:
            documents.append(Document(text, str(path), row=where.number - 1))
    return documents


def _paragraphs(path: Path, lines) -> list[Document]:
    """Documents of a text file: runs of non-blank lines, each remembering its first line."""
    documents: list[Document] = []
    paragraph: list[str] = []
    start = 0
    for where, content in lines:
        if _BLANK_LINE.match(content):
            if paragraph:
                documents.append(Document("\n".join(paragraph).strip(), str(path), line=start))
                paragraph = []
            continue
        if not paragraph:
            start = where.number
        paragraph.append(content.rstrip())
    if paragraph:
        documents.append(Document("\n".join(paragraph).strip(), str(path), line=start))
    return documents


def _text_of(path: Path, where: Location, record: dict[str, Any], text_field: str) -> str:
    """The text field of one record, or a CorpusError naming the file, line or row, and field."""
    if text_field not in record:
        available = ", ".join(sorted(map(str, record))) or "none"
        raise CorpusError(path, f"missing (fields present: {available})", where=where, field=text_field)
    value = record[text_field]
    if not isinstance(value, str):
        raise CorpusError(path, f"expected a string, got {reader.json_type(value)}", where=where, field=text_field)
    return value
