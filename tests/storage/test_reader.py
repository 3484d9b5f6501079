"""storage.reader: every format, every location, and the one message format of InputError.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/storage/test_reader.py
"""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import AlignflowError, InputError, format_message
from storage.reader import Location, expand_sources, read_parquet_table, read_records


def records(path, **options):
    return [(str(where), record) for where, record in read_records(path, **options)]


def error_of(path, **options) -> str:
    with pytest.raises(InputError) as info:
        list(read_records(path, **options))
    return str(info.value)


def test_the_message_format():
    assert format_message("a.jsonl", "line 3", "instruction", "missing") == "a.jsonl: line 3: field 'instruction': missing"
    assert format_message("a.parquet", None, "text", "missing column") == "a.parquet: field 'text': missing column"
    assert format_message(None, None, None, "no sources") == "no sources"
    error = InputError("s.jsonl", "missing", where=Location("line", 3), field="instruction")
    assert (error.path, error.location, error.field, error.problem) == ("s.jsonl", "line 3", "instruction", "missing")
    assert str(InputError("--threshold must be in (0, 1]")) == "--threshold must be in (0, 1]"
    assert isinstance(error, ValueError) and isinstance(error, AlignflowError)


class Custom(InputError):
    """A caller's own subclass, as CorpusError or SeedFormatError."""


def test_errors_survive_pickling_with_their_class_and_parts():
    error = pickle.loads(pickle.dumps(Custom("f.json", "bad", where="row 2 (line 3)", field="x")))
    assert type(error) is Custom and str(error) == "f.json: row 2 (line 3): field 'x': bad"
    assert (error.location, error.field) == ("row 2 (line 3)", "x")


def test_text_lines_keep_their_numbers_and_crlf_and_bom_are_dropped(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\n\r\nthree\n")
    assert records(path) == [("line 1", "one"), ("line 2", ""), ("line 3", "three")]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}')
    assert records(path) == [("line 1", {"a": 1}), ("line 4", {"a": 2})]


def test_a_json_list_gives_rows_with_the_line_each_starts_on(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}], indent=2))
    assert records(path) == [("row 1 (line 2)", {"a": 1}), ("row 2 (line 5)", {"a": 2})]


def test_parquet_rows_columns_and_required(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), path)
    assert records(path, columns=["b", "absent"]) == [("row 1", {"b": "x"}), ("row 2", {"b": "y"})]
    assert error_of(path, required=["text", "a", "label"]) == (
        f"{path}: field 'text': missing column (also missing: label; columns present: a, b)")
    assert read_parquet_table(path, columns=["a"]).column_names == ["a"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", b'{"a": 1}\n{"a": \n', "line 2: malformed JSON: Expecting value at column 7"),
        ("a.jsonl", b'{"a": 1}\n[1]\n', "line 2: expected a JSON object, got list"),
        ("a.json", b'[{"a": 1}, 2]', "row 2 (line 1): expected a JSON object, got number"),
        ("a.json", b'[\n{"a": 1},\n{"a": }]', "line 3: malformed JSON: Expecting value at column 7"),
        ("a.json", b'{\n  "a": 1\n}\n', "holds one JSON object over several lines; expected one object a line "
                                       "(JSON Lines) or a JSON list of objects"),
        ("a.txt", b"ok\ncaf\xe9\n", "line 2: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"),
        ("a.txt", "caf\u00e9\n".encode() + b"caf\xe9\n",
         "line 2: not valid UTF-8 (byte 0xe9 at column 4); earlier lines hold UTF-8, so the file mixes encodings; "
         "save the file as UTF-8"),
        ("a.txt", b"\x7fELF\x02\x01\x01\x00", "binary data (a NUL byte at offset 7), not UTF-8 text"),
        ("a.jsonl", '{"a": 1}\n'.encode("utf-16"), "the file is UTF-16-encoded (it starts with a UTF-16 byte-order mark); "
                                                  "save it as UTF-8"),
        ("a.parquet", b"PAR1 but not really", None),
        ("a.csv", b"a,b\n", "unsupported file suffix '.csv'; use one of .txt, .md, .jsonl, .ndjson, .json, .parquet, .pq"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    text = error_of(path)
    if message is None:
        assert text.startswith(f"{path}: not a readable Parquet file (")
    else:
        assert text == f"{path}: {message}"


def test_empty_files_yield_nothing(tmp_path):
    for name, content in [("a.jsonl", b""), ("b.json", b"  \n"), ("c.txt", b"\xef\xbb\xbf")]:
        (tmp_path / name).write_bytes(content)
        assert records(tmp_path / name) == []
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), tmp_path / "d.parquet")
    assert records(tmp_path / "d.parquet") == []


def test_missing_paths_folders_and_globs(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    assert error_of(tmp_path) == f"{tmp_path}: is a folder, not a file"
    with pytest.raises(InputError) as info:
        expand_sources([str(tmp_path / "*.jsonl")])
    assert str(info.value) == f"{tmp_path / '*.jsonl'}: the glob matches no files"
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "a.jsonl").write_text("")
    assert expand_sources([str(tmp_path / "*.jsonl")]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert expand_sources([tmp_path]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]


def test_the_caller_error_class_is_raised(tmp_path):
    class SeedError(InputError):
        pass

    with pytest.raises(SeedError, match="no such file"):
        list(read_records(tmp_path / "x.jsonl", error=SeedError))
