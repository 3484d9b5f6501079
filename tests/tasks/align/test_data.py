"""Loading, validating and splitting instruction data for the align stage."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.align.data import DataError, load_sft_table, split_train_eval, to_prompt_completion_dataset

from .conftest import instruction_rows


def write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_loads_prompt_completion_parquet(tmp_path):
    table = load_sft_table(write(tmp_path / "d.parquet", [{"prompt": "Say hi.", "completion": "Hi!"}]))
    assert table.column_names == ["prompt", "completion", "prompt_messages"]
    assert table.to_pylist() == [
        {"prompt": "Say hi.", "completion": "Hi!", "prompt_messages": [{"role": "user", "content": "Say hi."}]}
    ]


def test_loads_chat_messages_and_keeps_the_context(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."},
            ]
        }
    ]
    table = load_sft_table(write(tmp_path / "chat.parquet", rows))
    row = table.to_pylist()[0]
    assert row["prompt"] == "Name a color."
    assert row["completion"] == "Red."
    assert [m["role"] for m in row["prompt_messages"]] == ["system", "user"]


def test_folder_prefers_the_sft_view_over_other_tables(tmp_path):
    write(tmp_path / "instances.parquet", [{"instruction_id": "a", "input": "", "output": "x"}])
    write(tmp_path / "sft.parquet", [{"prompt": "p", "completion": "c"}])
    assert load_sft_table(tmp_path).column("prompt").to_pylist() == ["p"]


def test_folder_without_usable_table_names_files_and_columns(tmp_path):
    write(tmp_path / "instances.parquet", [{"instruction_id": "a", "output": "x"}])
    with pytest.raises(DataError, match=r"instances\.parquet: instruction_id, output"):
        load_sft_table(tmp_path)


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = write(tmp_path / "bad.parquet", [{"prompt": "p", "answer": "c"}])
    with pytest.raises(DataError, match=r"bad\.parquet: missing column\(s\) completion"):
        load_sft_table(path)


def test_empty_completion_names_row_and_field(tmp_path):
    path = write(tmp_path / "d.parquet", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}])
    with pytest.raises(DataError, match=r"d\.parquet: row 1: field `completion` is empty"):
        load_sft_table(path)


def test_chat_with_unknown_role_or_no_answer_is_refused(tmp_path):
    bad_role = [{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}]
    with pytest.raises(DataError, match=r"row 0: field `messages\[1\]\.role` is 'robot'"):
        load_sft_table(write(tmp_path / "a.parquet", bad_role))
    no_answer = [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}]
    with pytest.raises(DataError, match="must end with an assistant message"):
        load_sft_table(write(tmp_path / "b.parquet", no_answer))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft_table(tmp_path / "nope.parquet")


def test_split_is_by_prompt_and_independent_of_row_order():
    rows = instruction_rows()
    # A duplicated prompt with another answer must land on the same side (no train/eval leakage).
    rows.append({"prompt": rows[0]["prompt"], "completion": "another answer"})
    table = pa.Table.from_pylist(rows)
    train, held_out = split_train_eval(table, eval_fraction=0.2, seed=0)
    assert train.num_rows + held_out.num_rows == table.num_rows
    train_prompts, eval_prompts = set(train.column("prompt").to_pylist()), set(held_out.column("prompt").to_pylist())
    assert not train_prompts & eval_prompts
    assert 0.1 < held_out.num_rows / table.num_rows < 0.3

    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    train2, held_out2 = split_train_eval(pa.Table.from_pylist(shuffled), eval_fraction=0.2, seed=0)
    assert set(held_out2.column("prompt").to_pylist()) == eval_prompts
    assert sorted(map(tuple, (r.values() for r in held_out2.to_pylist()))) == sorted(
        map(tuple, (r.values() for r in held_out.to_pylist()))
    )

    # A prompt keeps its side when rows are added to the table.
    _, held_out_sub = split_train_eval(pa.Table.from_pylist(rows[:60]), eval_fraction=0.2, seed=0)
    assert set(held_out_sub.column("prompt").to_pylist()) == eval_prompts & {r["prompt"] for r in rows[:60]}

    _, other_seed = split_train_eval(table, eval_fraction=0.2, seed=1)
    assert set(other_seed.column("prompt").to_pylist()) != eval_prompts


def test_empty_split_is_a_clear_error():
    table = pa.Table.from_pylist([{"prompt": "only one", "completion": "row"}])
    with pytest.raises(DataError, match=r"split is empty \(1 rows, eval_fraction=0.5"):
        split_train_eval(table, eval_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="eval_fraction must be between 0 and 1"):
        split_train_eval(table, eval_fraction=1.0, seed=0)


def test_prompt_completion_dataset_is_trl_conversational(tmp_path):
    table = load_sft_table(write(tmp_path / "d.parquet", [{"prompt": "Say hi.", "completion": "Hi!"}]))
    dataset = to_prompt_completion_dataset(table)
    assert dataset[0] == {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "completion": [{"role": "assistant", "content": "Hi!"}],
    }
    # A raw (not normalized) table is accepted too.
    raw = pa.Table.from_pylist([{"prompt": "Say hi.", "completion": "Hi!"}])
    assert to_prompt_completion_dataset(raw)[0] == dataset[0]
