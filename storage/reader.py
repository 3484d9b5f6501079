"""One reader for every input file: text, JSON Lines, JSON (a list of objects, as Alpaca writes) and Parquet.

    from storage.reader import read_records
    for where, record in read_records("seeds.jsonl"):
        print(where, record)      # line 1 {'instruction': ...}

`read_records(path)` yields `(where, record)`: `where` is a `Location` (`line 3`, or `row 2 (line 5)`
for an item of a JSON list, `row 2` for Parquet; 1-based) and `record` is a dict for JSON, JSON Lines
and Parquet, or the text of one line for text files. Every problem raises one error type,
`InputError` (or the subclass a caller passes as `error=`), whose message is always

    FILE: line N: field 'NAME': PROBLEM

(see `storage.errors`). The reader handles:

- a UTF-8 byte-order mark (as Windows editors write): accepted and dropped;
- bytes that are not UTF-8, anywhere (a Latin-1 file, or one line pasted from another encoding):
  an error naming the line, the byte and its column; UTF-16/UTF-32 files are named as such;
- binary data (a NUL byte): an error, rather than a page of mojibake later;
- malformed JSON: an error naming the line and column; a pretty-printed single object (neither
  JSON Lines nor a list) is explained; a JSON value that is not an object is refused;
- an empty file: yields nothing; the caller says what it expected;
- a missing file, a folder, an unreadable file, a file that is not Parquet, Parquet lacking a
  required column, and a glob (`expand_sources`) that matches nothing.

Formats come from the suffix (`.txt`/`.md` text, `.jsonl`/`.ndjson`/`.json` JSON, `.parquet`/`.pq`
Parquet); a JSON file is a list when its first character is `[`, else JSON Lines (so JSON Lines
saved as `.json` read fine). Pass `format=` to skip the suffix check.

Run its tests with `pytest tests/storage/test_reader.py`.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from storage.errors import InputError

Format = Literal["auto", "text", "json", "parquet"]
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, *JSON_SUFFIXES, *PARQUET_SUFFIXES)

_GLOB_CHARS = re.compile(r"[*?\[]")
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass(frozen=True)
class Location:
    """Where a record is: `line N` in a text file, `row N` in a table or JSON list (1-based).

    `line` is, for a row of a JSON list, the line where the item starts (None otherwise).
    """

    kind: Literal["line", "row"]
    number: int
    line: int | None = None

    def __str__(self) -> str:
        if self.kind == "row" and self.line is not None:
            return f"row {self.number} (line {self.line})"
        return f"{self.kind} {self.number}"


def line(number: int) -> Location:
    return Location("line", number)


def row(number: int, at_line: int | None = None) -> Location:
    return Location("row", number, at_line)


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages: null, boolean, number, string, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---- which files ---------------------------------------------------------------------------------


def expand_sources(sources: Sequence[str | Path], suffixes: Sequence[str] = SUPPORTED_SUFFIXES,
                   error: type[InputError] = InputError) -> list[Path]:
    """Paths, folders and globs -> the files to read, in a stable order.

    A glob expands sorted; a folder stands for every file below it with one of `suffixes`. A glob
    matching no file, an empty folder and a missing path raise `error`.
    """
    files: list[Path] = []
    for source in sources:
        text = str(source)
        if _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(str(Path(text).expanduser()), recursive=True))
            matches = [m for m in matches if Path(m).is_file()]
            if not matches:
                raise error(text, "the glob matches no files")
            files.extend(Path(m) for m in matches)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise error(text, f"the folder holds no files with a supported suffix ({', '.join(suffixes)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise error(text, "no such file")
    return files


def detect_format(path: Path, error: type[InputError] = InputError) -> Format:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise error(path, f"unsupported file suffix {path.suffix or '(none)'!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")


# ---- reading -------------------------------------------------------------------------------------


def read_records(path: str | Path, *, format: Format = "auto", columns: Sequence[str] | None = None,
                 required: Sequence[str] = (), error: type[InputError] = InputError) -> Iterator[tuple[Location, Any]]:
    """Yield `(where, record)` for each record of `path`, in file order (see the module docstring).

    columns: Parquet only, the columns to read (those the file lacks are left out; None: all).
    required: Parquet only, columns that must exist (checked before any row is read).
    error: the InputError subclass to raise, so each caller keeps its own error class.
    """
    path = Path(path)
    _check_file(path, error)
    if format == "auto":
        format = detect_format(path, error)
    if format == "parquet":
        yield from _parquet_rows(path, columns, required, error)
        return
    text = decode(path, _read_bytes(path, error), error)
    if format == "text":
        yield from ((line(n), content) for n, content in enumerate(split_lines(text), start=1))
    elif format == "json":
        yield from _json_records(path, text, error)
    else:
        raise ValueError(f"unknown format {format!r}")


def _check_file(path: Path, error: type[InputError]) -> None:
    if not path.exists():
        raise error(path, "no such file")
    if not path.is_file():
        raise error(path, "is a folder, not a file" if path.is_dir() else "is not a regular file")


def _read_bytes(path: Path, error: type[InputError]) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(path, f"cannot read the file: {exc.strerror or exc}") from None


def split_lines(text: str) -> list[str]:
    """The lines of `text` as an editor numbers them: split on \\n only, a trailing \\r dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line starts no new line
    return [item[:-1] if item.endswith("\r") else item for item in lines]


def decode(path: Path, data: bytes, error: type[InputError] = InputError) -> str:
    """UTF-8 text of `data` (a leading BOM dropped); other encodings and binary data raise `error`."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise error(path, f"the file is {name}-encoded (it starts with a {name} byte-order mark); save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise error(path, f"binary data (a NUL byte at offset {nul}), not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        number = data.count(b"\n", 0, exc.start) + 1
        problem = f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start - start + 1})"
        if any(byte >= 0x80 for byte in data[:start]):
            problem += "; earlier lines hold UTF-8, so the file mixes encodings"
        raise error(path, problem + "; save the file as UTF-8", where=line(number)) from None


def _json_records(path: Path, text: str, error: type[InputError]) -> Iterator[tuple[Location, dict]]:
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "[":
        yield from _json_list(path, text, error)
        return
    for number, content in enumerate(split_lines(text), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as exc:
            if number == _first_line(text) and _is_one_object(text):
                raise error(path, "holds one JSON object over several lines; expected one object a line "
                                  "(JSON Lines) or a JSON list of objects") from None
            raise error(path, _malformed(exc), where=line(number)) from None
        if not isinstance(record, dict):
            raise error(path, f"expected a JSON object, got {json_type(record)}", where=line(number))
        yield line(number), record


def _malformed(exc: json.JSONDecodeError) -> str:
    # json's messages read "Expecting value" or "Unterminated string starting at".
    where = "column" if exc.msg.endswith(" at") else "at column"
    return f"malformed JSON: {exc.msg} {where} {exc.colno}"


def _first_line(text: str) -> int:
    return text[: len(text) - len(text.lstrip())].count("\n") + 1


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_list(path: Path, text: str, error: type[InputError]) -> Iterator[tuple[Location, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(path, _malformed(exc), where=line(exc.lineno)) from None
    if not isinstance(items, list):  # "[1] [2]" cannot get here (extra data); kept for clarity
        raise error(path, f"expected a JSON list of objects, got {json_type(items)}")
    # Walk the list again only to learn where each item starts, so messages can point at it.
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    for number, item in enumerate(items, start=1):
        while text[position] in " \t\r\n,":
            position += 1
        where = row(number, text.count("\n", 0, position) + 1)
        _, position = decoder.raw_decode(text, position)
        if not isinstance(item, dict):
            raise error(path, f"expected a JSON object, got {json_type(item)}", where=where)
        yield where, item


# ---- Parquet -------------------------------------------------------------------------------------


def _open_parquet(path: Path, required: Sequence[str], error: type[InputError]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except OSError as exc:
        raise error(path, f"cannot read the file: {exc.strerror or exc}") from None
    except pa.ArrowException as exc:
        raise error(path, f"not a readable Parquet file ({exc})") from None
    names = handle.schema_arrow.names
    missing = [name for name in required if name not in names]
    if missing:
        also = f"also missing: {', '.join(missing[1:])}; " if len(missing) > 1 else ""
        raise error(path, f"missing column ({also}columns present: {', '.join(names) or 'none'})", field=missing[0])
    return handle


def read_parquet_table(path: str | Path, columns: Sequence[str] | None = None, required: Sequence[str] = (),
                       error: type[InputError] = InputError):
    """A whole Parquet file as a pyarrow Table (types kept), with the reader's checks and errors."""
    import pyarrow as pa

    path = Path(path)
    _check_file(path, error)
    handle = _open_parquet(path, required, error)
    names = handle.schema_arrow.names
    try:
        return handle.read(columns=None if columns is None else [c for c in columns if c in names])
    except (OSError, pa.ArrowException) as exc:
        raise error(path, f"not a readable Parquet file ({exc})") from None


def _parquet_rows(path: Path, columns: Sequence[str] | None, required: Sequence[str],
                  error: type[InputError]) -> Iterator[tuple[Location, dict]]:
    import pyarrow as pa

    handle = _open_parquet(path, required, error)
    names = handle.schema_arrow.names
    wanted = None if columns is None else [c for c in columns if c in names]
    number = 0
    try:
        batches = handle.iter_batches(columns=wanted)
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield row(number), record
    except (OSError, pa.ArrowException) as exc:
        raise error(path, f"cannot read the rows after row {number} ({exc})") from None
