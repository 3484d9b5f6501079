"""Tests of corpus input: every format, glob expansion, and every bad-input message.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/tasks/pretrain/test_corpus.py
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.pretrain.corpus import CorpusError, Document, read_corpus


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_text_file_splits_on_blank_lines_and_remembers_start_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(
        "First paragraph, line one.\nFirst paragraph, line two.\n\n\n  \nSecond paragraph.\n\nThird.\n",
        encoding="utf-8",
    )
    docs = read_corpus([str(path)])
    assert [d.text for d in docs] == [
        "First paragraph, line one.\nFirst paragraph, line two.",
        "Second paragraph.",
        "Third.",
    ]
    assert [d.line for d in docs] == [1, 6, 8]
    assert all(d.source == str(path) and d.row is None for d in docs)


def test_markdown_file_is_read_like_text(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# Title\n\nSome prose here.\n", encoding="utf-8")
    assert [d.text for d in read_corpus([str(path)])] == ["# Title", "Some prose here."]


def test_jsonl_reads_text_field_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta"}\n', encoding="utf-8")
    docs = read_corpus([str(path)])
    assert docs == [Document("alpha", str(path), line=1), Document("beta", str(path), line=3)]


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "hello world"}])
    assert read_corpus([str(path)], text_field="body")[0].text == "hello world"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        read_corpus([str(path)])
    assert str(info.value) == f"{path}: line 3: malformed JSON: Unterminated string starting at column 10"


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"content": "no text here"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 2: field 'text': missing \(fields present: content\)"):
        read_corpus([str(path)])


def test_jsonl_non_string_field_names_file_line_field_and_type(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": 42}])
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 1: field 'text': expected a string, got number"):
        read_corpus([str(path)])
    write_jsonl(path, [{"text": "a"}, {"text": None}])
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 2: field 'text': expected a string, got null"):
        read_corpus([str(path)])


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 2: expected a JSON object, got list"):
        read_corpus([str(path)])


def test_json_list_of_objects(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    docs = read_corpus([str(path)])
    assert [(d.text, d.row, d.line) for d in docs] == [("one", 0, None), ("two", 1, None)]


def test_json_errors_name_file_and_item_or_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": "one"}, {"title": "two"}]), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.json: row 2 \(line 1\): field 'text': missing"):
        read_corpus([str(path)])
    path.write_text(json.dumps(["not an object"]), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.json: row 1 \(line 1\): expected a JSON object, got string"):
        read_corpus([str(path)])
    path.write_text(json.dumps({"text": "not a list"}, indent=2), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.json: holds one JSON object over several lines"):
        read_corpus([str(path)])
    path.write_text('[\n{"text": "one"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.json: line 3: malformed JSON: Expecting value at column 10"):
        read_corpus([str(path)])


def test_json_lines_saved_as_json_and_a_one_line_object_are_read(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    assert [(d.text, d.line) for d in read_corpus([str(path)])] == [("one", 1), ("two", 2)]


def test_parquet_text_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["first doc", "second doc"]}), path)
    docs = read_corpus([str(path)])
    assert docs == [Document("first doc", str(path), row=0), Document("second doc", str(path), row=1)]


def test_parquet_missing_column_names_file_column_and_available_columns(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    with pytest.raises(CorpusError) as info:
        read_corpus([str(path)])
    assert str(info.value) == f"{path}: field 'text': missing column (columns present: id, body)"


def test_parquet_null_names_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), path)
    with pytest.raises(CorpusError, match=r"c\.parquet: row 2: field 'text': expected a string, got null"):
        read_corpus([str(path)])


def test_parquet_non_string_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(CorpusError, match=r"c\.parquet: row 1: field 'text': expected a string, got number"):
        read_corpus([str(path)])


def test_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_text("this is not parquet", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.parquet: not a readable Parquet file \("):
        read_corpus([str(path)])


def test_glob_expands_sorted_across_formats(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    (tmp_path / "c.txt").write_text("from c\n", encoding="utf-8")
    docs = read_corpus([str(tmp_path / "*.jsonl"), str(tmp_path / "*.txt")])
    assert [d.text for d in docs] == ["from a", "from b", "from c"]


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(CorpusError) as info:
        read_corpus([pattern])
    assert str(info.value) == f"{pattern}: the glob matches no files"


def test_missing_file_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(CorpusError) as info:
        read_corpus([missing])
    assert str(info.value) == f"{missing}: no such file"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden\n", encoding="utf-8")
    path.chmod(0)
    try:
        with pytest.raises(CorpusError, match=r"secret\.txt: cannot read the file: Permission denied"):
            read_corpus([str(path)])
    finally:
        path.chmod(0o600)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("good line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError) as info:
        read_corpus([str(path)])
    assert str(info.value) == f"{path}: line 3: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"latin\.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        read_corpus([str(jsonl)])


def test_binary_bytes_and_utf16_are_named(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(CorpusError) as info:
        read_corpus([str(path)])
    assert str(info.value) == f"{path}: binary data (a NUL byte at offset 8), not UTF-8 text"
    path.write_bytes("hello\n".encode("utf-16"))
    with pytest.raises(CorpusError, match=r"image\.txt: the file is UTF-16-encoded"):
        read_corpus([str(path)])


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    assert [(d.text, d.line) for d in read_corpus([str(path)])] == [("first", 1), ("second", 2)]


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"data\.csv: unsupported corpus file suffix '\.csv'; use one of \.txt"):
        read_corpus([str(path)])


def test_directory_stands_for_its_supported_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("zed\n", encoding="utf-8")
    (tmp_path / "a.md").write_text("ay\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x\n", encoding="utf-8")
    assert [d.text for d in read_corpus([str(tmp_path)])] == ["ay", "zed"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match=r"empty: the folder holds no files with a supported suffix"):
        read_corpus([str(empty)])


def test_no_sources_is_an_error_and_a_single_string_is_one_source(tmp_path):
    with pytest.raises(CorpusError, match="no corpus sources"):
        read_corpus([])
    path = tmp_path / "one.txt"
    path.write_text("only document\n", encoding="utf-8")
    assert [d.text for d in read_corpus(str(path))] == ["only document"]


def test_corpus_error_is_a_value_error_and_documents_are_frozen(tmp_path):
    from storage.errors import AlignflowError, InputError

    assert issubclass(CorpusError, ValueError) and issubclass(CorpusError, InputError)
    assert issubclass(CorpusError, AlignflowError)
    doc = Document("x", "f.jsonl", line=3)
    assert doc.location == "f.jsonl: line 3"
    assert Document("x", "f.parquet", row=7).location == "f.parquet: row 8"
    with pytest.raises(AttributeError):
        doc.text = "y"  # type: ignore[misc]
