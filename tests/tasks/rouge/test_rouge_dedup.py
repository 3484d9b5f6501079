"""`alignflow dedup`: reading JSON/JSONL/Parquet, counting bad rows, writing kept rows, errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.rouge import cli
from tasks.rouge.dedup import DedupError, dedup_file, read_table

REPO = Path(__file__).resolve().parents[3]

ROWS = [
    {"id": 1, "instruction": "Write a short poem about the sea.", "output": "Waves."},
    {"id": 2, "instruction": "Write a short poem about the sea!", "output": "Tides."},  # duplicate
    {"id": 3, "instruction": "Give three tips for staying healthy.", "output": "Sleep."},
    {"id": 4, "instruction": "", "output": "blank"},  # empty
    {"id": 5, "output": "no instruction"},  # missing
    {"id": 6, "instruction": None, "output": "null"},  # missing
    {"id": 7, "instruction": "Translate the sentence into French.", "output": "Bonjour."},
    {"id": 8, "instruction": "Give 3 tips for staying healthy.", "output": "Eat."},  # near duplicate
    {"id": 9, "instruction": "한국어 문장", "output": "no a-z tokens"},  # no tokens under rouge
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> int:
    """Through an argparse parser of our own, as the `alignflow` command wires it."""
    parser = argparse.ArgumentParser(prog="alignflow")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_dedup_jsonl_keeps_novel_rows_with_scores(tmp_path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ROWS)
    output = tmp_path / "out" / "kept.parquet"
    assert run_cli(["dedup", "--input", str(source), "--column", "instruction", "--output", str(output)]) == 0
    kept = pq.read_table(output).to_pylist()
    assert [row["id"] for row in kept] == [1, 3, 7]
    assert set(kept[0]) == {"id", "instruction", "output", "max_rouge_l", "most_similar"}
    assert kept[0]["max_rouge_l"] == 0.0 and kept[0]["most_similar"] is None
    assert kept[2]["most_similar"] is not None and 0.0 < kept[2]["max_rouge_l"] <= 0.7
    printed = capsys.readouterr().out
    for count in ("kept 3", "rejected 2", "empty 1", "missing 2", "no tokens 1"):
        assert count in printed
    assert "--tokenizer unicode" in printed  # the hint for the Korean row
    assert sorted(p.name for p in output.parent.iterdir()) == ["kept.parquet"]  # no temp file left
    counts = json.loads(pq.read_schema(output).metadata[b"alignflow.dedup"])
    assert (counts["kept"], counts["rejected"], counts["empty"], counts["missing"]) == (3, 2, 1, 2)


def test_json_list_and_parquet_inputs_give_the_same_rows(tmp_path) -> None:
    json_path = tmp_path / "in.json"
    json_path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    parquet_path = tmp_path / "in.parquet"
    pq.write_table(read_table(json_path), parquet_path)
    results = []
    for source in (json_path, parquet_path, write_jsonl(tmp_path / "in.jsonl", ROWS)):
        out = tmp_path / f"{source.suffix[1:]}.parquet"
        result = dedup_file(source, "instruction", out, show_progress=False)
        assert (result.kept, result.rejected, result.empty, result.missing, result.no_tokens) == (3, 2, 1, 2, 1)
        results.append(pq.read_table(out).to_pylist())
    assert results[0] == results[1] == results[2]


def test_against_file_drops_rows_similar_to_the_references(tmp_path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ROWS)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"task": "Translate this sentence into French."}])
    result = dedup_file(source, "instruction", tmp_path / "out.parquet", against=seeds,
                        against_column="task", show_progress=False)
    kept = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["id"] for row in kept] == [1, 3]
    assert result.references == 1 and result.rejected == 3


def test_unicode_tokenizer_dedups_korean(tmp_path) -> None:
    rows = [
        {"instruction": "다음 문장을 영어로 번역하세요."},
        {"instruction": "다음 문장을 영어로 빨리 번역하세요."},
        {"instruction": "고양이에 대한 짧은 시를 써 주세요."},
    ]
    source = write_jsonl(tmp_path / "ko.jsonl", rows)
    assert run_cli(["dedup", "--input", str(source), "--tokenizer", "unicode",
                    "--output", str(tmp_path / "ko.parquet")]) == 0
    kept = pq.read_table(tmp_path / "ko.parquet").column("instruction").to_pylist()
    assert kept == [rows[0]["instruction"], rows[2]["instruction"]]


def test_existing_score_columns_are_replaced(tmp_path) -> None:
    rows = [{"instruction": "a b c", "max_rouge_l": "old", "most_similar": 5}, {"instruction": "d e f"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    dedup_file(source, "instruction", tmp_path / "out.parquet", show_progress=False)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["instruction", "max_rouge_l", "most_similar"]
    assert table.schema.field("max_rouge_l").type == pa.float64()


def test_missing_column_names_file_and_column(tmp_path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    assert run_cli(["dedup", "--input", str(source), "--column", "instruction",
                    "--output", str(tmp_path / "o.parquet")]) == 2
    error = capsys.readouterr().err
    assert f"alignflow dedup: error: {source}: field 'instruction': missing column (columns present: prompt)" in error
    assert not (tmp_path / "o.parquet").exists()


def test_malformed_jsonl_line_names_file_and_line(tmp_path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"instruction": "ok"}\n\n{"instruction": oops}\n', encoding="utf-8")
    with pytest.raises(DedupError, match=r"bad\.jsonl: line 3: malformed JSON: Expecting value at column 17"):
        dedup_file(source, "instruction", tmp_path / "o.parquet", show_progress=False)


def test_unreadable_inputs_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DedupError, match=r"nope\.jsonl: no such file$"):
        dedup_file(tmp_path / "nope.jsonl", "instruction", tmp_path / "o.parquet")
    with pytest.raises(DedupError, match=": is a folder, not a file$"):
        dedup_file(tmp_path, "instruction", tmp_path / "o.parquet")
    garbage = tmp_path / "x.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DedupError, match=r"x\.parquet: not a readable Parquet file \("):
        dedup_file(garbage, "instruction", tmp_path / "o.parquet")
    text = tmp_path / "list.json"
    text.write_text('{"a": 1} trailing', encoding="utf-8")
    with pytest.raises(DedupError, match=r"list\.json: line 1: malformed JSON: Extra data at column 10"):
        dedup_file(text, "instruction", tmp_path / "o.parquet")


def test_non_text_value_names_row_and_column(tmp_path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "fine"}, {"instruction": 42}])
    with pytest.raises(DedupError, match=r"in\.jsonl: line 2: field 'instruction': expected a string as in earlier rows, got number \(42\)"):
        dedup_file(source, "instruction", tmp_path / "o.parquet")


@pytest.mark.parametrize("threshold", ["0", "1.5", "-0.2", "nan"])
def test_threshold_outside_zero_one_is_an_error(tmp_path, capsys, threshold) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert run_cli(["dedup", "--input", str(source), "--threshold", threshold,
                    "--output", str(tmp_path / "o.parquet")]) == 2
    assert "--threshold must be in (0, 1]" in capsys.readouterr().err


def test_module_command_runs_as_a_subprocess(tmp_path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ROWS)
    output = tmp_path / "kept.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.rouge.cli", "dedup", "--input", str(source), "--output", str(output),
         "--threshold", "0.7", "--stemming"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "kept 3" in done.stdout and "rejected 2" in done.stdout
    assert pq.read_table(output).num_rows == 3

    help_text = subprocess.run([sys.executable, "-m", "tasks.rouge.cli", "dedup", "--help"], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=120).stdout
    for option in ("--input", "--column", "--against", "--threshold", "--tokenizer", "--stemming", "--output"):
        assert option in help_text
