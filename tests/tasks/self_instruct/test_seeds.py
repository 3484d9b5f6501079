"""Tests for tasks.self_instruct.seeds: every accepted format and every error the loader reports."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.self_instruct.filters import filter_instances, filter_instruction
from tasks.self_instruct.seeds import (
    Instance,
    SeedFormatError,
    SeedTask,
    demo_seed_path,
    load_seed_tasks,
    seed_file_sha256,
)


def write_lines(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def task(instruction="Summarize the text in one sentence.", **fields) -> dict:
    record = {"instruction": instruction, "instances": [{"input": "Some text.", "output": "A summary."}]}
    record.update(fields)
    return record


# --- accepted formats -------------------------------------------------------------------------


def test_self_instruct_jsonl_reads_every_field(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [
        {"id": "t1", "name": "sentiment", "instruction": "Classify the sentiment of the review.",
         "instances": [{"input": "Great phone.", "output": "Positive"}, {"input": "Broke in a day.", "output": "Negative"}],
         "is_classification": True},
        {"id": "t2", "instruction": "List three fruits that are yellow.",
         "instances": [{"input": "", "output": "Banana, lemon, pineapple"}]},
    ])
    tasks = load_seed_tasks(path)
    assert tasks == [
        SeedTask(id="t1", name="sentiment", instruction="Classify the sentiment of the review.",
                 instances=[Instance(input="Great phone.", output="Positive"),
                            Instance(input="Broke in a day.", output="Negative")],
                 is_classification=True),
        SeedTask(id="t2", name=None, instruction="List three fruits that are yellow.",
                 instances=[Instance(input="", output="Banana, lemon, pineapple")], is_classification=False),
    ]


def test_ids_are_generated_from_the_task_position_and_unknown_fields_ignored(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [
        task(motivation_app="x", extra={"nested": [1, 2]}),
        task("Name two rivers in Europe.", id="custom"),
        task("Give an antonym of the word."),
    ])
    assert [t.id for t in load_seed_tasks(path)] == ["seed_task_0", "custom", "seed_task_2"]


def test_blank_lines_are_skipped_and_crlf_and_bom_are_accepted(tmp_path):
    path = tmp_path / "seeds.jsonl"
    body = "\r\n\r\n".join(json.dumps(task(f"Describe the color number {i} in detail.")) for i in range(3))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode() + b"\r\n\r\n")
    tasks = load_seed_tasks(path)
    assert [t.instruction for t in tasks] == [f"Describe the color number {i} in detail." for i in range(3)]


def test_missing_instance_input_means_no_input(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [
        {"instruction": "Tell a joke about cats.", "instances": [{"output": "Why did the cat sit on the computer? To keep an eye on the mouse."}]},
        {"instruction": "Tell a joke about dogs.", "instances": [{"input": None, "output": "A dog joke."}]},
    ])
    assert [t.instances[0].input for t in load_seed_tasks(path)] == ["", ""]


def test_alpaca_json_list_gives_one_task_per_item(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Give three tips for sleeping well.", "input": "", "output": "Keep a schedule; avoid screens; keep the room cool."},
        {"instruction": "Translate the sentence into German.", "input": "Good morning", "output": "Guten Morgen", "extra": 1},
        {"instruction": "Is the number even or odd?", "input": "7", "output": "Odd", "is_classification": True},
    ], indent=2), encoding="utf-8")
    tasks = load_seed_tasks(path)
    assert [t.id for t in tasks] == ["seed_task_0", "seed_task_1", "seed_task_2"]
    assert tasks[1] == SeedTask(id="seed_task_1", instruction="Translate the sentence into German.",
                                instances=[Instance(input="Good morning", output="Guten Morgen")])
    assert tasks[0].instances == [Instance(input="", output="Keep a schedule; avoid screens; keep the room cool.")]
    assert [t.is_classification for t in tasks] == [False, False, True]


def test_jsonl_with_alpaca_columns(tmp_path):
    path = write_lines(tmp_path / "alpaca.jsonl", [
        {"instruction": "Name the capital of the country.", "input": "Peru", "output": "Lima"},
        {"instruction": "Suggest a name for a goldfish.", "output": "Bubbles"},
        task("A Self-Instruct line may sit in the same file."),
    ])
    tasks = load_seed_tasks(path)
    assert [t.instances for t in tasks] == [
        [Instance(input="Peru", output="Lima")],
        [Instance(input="", output="Bubbles")],
        [Instance(input="Some text.", output="A summary.")],
    ]


def test_parquet_with_alpaca_columns(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({
        "instruction": ["Name the capital of the country.", "Suggest a name for a goldfish."],
        "input": ["Peru", ""],
        "output": ["Lima", "Bubbles"],
    }), path)
    tasks = load_seed_tasks(path)
    assert [(t.id, t.instruction, t.instances) for t in tasks] == [
        ("seed_task_0", "Name the capital of the country.", [Instance(input="Peru", output="Lima")]),
        ("seed_task_1", "Suggest a name for a goldfish.", [Instance(input="", output="Bubbles")]),
    ]


def test_parquet_with_self_instruct_columns(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b"],
        "instruction": ["Classify the review as positive or negative.", "Write a limerick about tea."],
        "instances": [[{"input": "Loved it", "output": "Positive"}], [{"input": "", "output": "There once was a pot full of tea..."}]],
        "is_classification": [True, False],
    }), path)
    tasks = load_seed_tasks(path)
    assert [t.id for t in tasks] == ["a", "b"]
    assert tasks[0].instances == [Instance(input="Loved it", output="Positive")]
    assert [t.is_classification for t in tasks] == [True, False]


# --- errors -------------------------------------------------------------------------------------


def load_error(path: Path) -> str:
    with pytest.raises(SeedFormatError) as info:
        load_seed_tasks(path)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(path) in message
    return message


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [task(), '{"instruction": "Broken line", "instances": [', task("Another fine task here.")])
    assert load_error(path) == f"{path}: line 2: malformed JSON: Expecting value at column 46"


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"instances": [{"input": "", "output": "x"}]}, "field 'instruction'", "missing"),
        ({"instruction": None, "instances": [{"input": "", "output": "x"}]}, "field 'instruction'", "missing"),
        ({"instruction": "   ", "instances": [{"input": "", "output": "x"}]}, "field 'instruction'", "is empty"),
        ({"instruction": 42, "instances": [{"input": "", "output": "x"}]}, "field 'instruction'", "expected a string, got number"),
        ({"instruction": "Say hello to the user."}, "field 'instances'", "missing"),
        ({"instruction": "Say hello to the user.", "instances": []}, "field 'instances'", "is empty"),
        ({"instruction": "Say hello to the user.", "instances": {"input": "", "output": "hi"}}, "field 'instances'", "expected a list, got object"),
        ({"instruction": "Say hello to the user.", "instances": ["hi"]}, "field 'instances[0]'", "expected an object, got string"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": "", "output": "hi"}, {"input": "x"}]}, "field 'instances[1].output'", "missing"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": "", "output": 5}]}, "field 'instances[0].output'", "expected a string, got number"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": "", "output": " "}]}, "field 'instances[0].output'", "is empty"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": ["a"], "output": "hi"}]}, "field 'instances[0].input'", "expected a string, got list"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": "", "output": "hi"}], "is_classification": "yes"}, "field 'is_classification'", "expected true or false, got string"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": "", "output": "hi"}], "id": 7}, "field 'id'", "expected a string, got number"),
        ({"instruction": "Say hello to the user.", "instances": [{"input": "", "output": "hi"}], "name": False}, "field 'name'", "expected a string, got boolean"),
    ],
)
def test_bad_task_names_line_and_field(tmp_path, record, field, problem):
    path = write_lines(tmp_path / "seeds.jsonl", [task(), task("Another fine task here."), record])
    message = load_error(path)
    assert message.startswith(f"{path}: line 3: {field}: {problem}")


def test_a_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [task(), '"just a string"'])
    assert load_error(path) == f"{path}: line 2: expected a JSON object, got string"


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]", b"\xef\xbb\xbf"])
def test_empty_seed_file(tmp_path, content):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(content)
    assert load_error(path) == f"{path}: the seed file contains no seed tasks"


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [task(id="a"), task(id="b"), "", task(id="a")])
    assert load_error(path) == f"{path}: line 4: field 'id': duplicate seed id 'a', first used on line 1"


def test_generated_id_colliding_with_an_explicit_one_is_a_duplicate(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [task(id="seed_task_1"), task()])
    assert load_error(path) == f"{path}: line 2: field 'id': duplicate seed id 'seed_task_1', first used on line 1"


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    good = json.dumps(task()).encode()
    path.write_bytes(good + b"\n" + good.replace(b"Summarize", b"Summ\xe9rize") + b"\n")
    message = load_error(path)
    assert message == f"{path}: line 2: not valid UTF-8 (byte 0xe9 at column 22); save the file as UTF-8"


def test_non_utf8_bytes_in_an_alpaca_list_name_the_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_bytes(b'[\n  {"instruction": "Say hi to Jos\xe9.", "output": "Hi!"}\n]\n')
    assert load_error(path).startswith(f"{path}: line 2: not valid UTF-8 (byte 0xe9 at column 33)")


def test_alpaca_item_errors_name_the_item_and_its_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(
        '[\n  {"instruction": "Name a color.", "input": "", "output": "Blue"},\n'
        '  {"instruction": "Name a fruit.",\n   "input": ""}\n]\n', encoding="utf-8")
    message = load_error(path)
    assert message == f"{path}: row 2 (line 3): field 'instances': missing (and no Alpaca 'output' field)"


def test_alpaca_item_with_a_wrong_type_names_the_alpaca_field(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Name a fruit.", "input": 3, "output": "Apple"}]), encoding="utf-8")
    message = load_error(path)
    assert message == f"{path}: row 1 (line 1): field 'input': expected a string, got number"


def test_malformed_alpaca_json_names_the_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text('[\n  {"instruction": "Name a color.", "output": "Blue"},\n  {"instruction": oops}\n]', encoding="utf-8")
    assert load_error(path) == f"{path}: line 3: malformed JSON: Expecting value at column 19"


def test_parquet_without_the_needed_columns(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"prompt": ["x"], "output": ["y"]}), path)
    assert load_error(path) == f"{path}: field 'instruction': missing column (columns present: prompt, output)"
    pq.write_table(pa.table({"instruction": ["Name a color please."], "response": ["y"]}), path)
    assert load_error(path) == f"{path}: field 'output': missing column (or an 'instances' column)"


def test_parquet_row_errors_name_the_row(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"instruction": ["Name a color please.", None], "input": ["", ""], "output": ["Red", "Blue"]}), path)
    assert load_error(path) == f"{path}: row 2: field 'instruction': missing"


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "seeds.parquet"
    path.write_bytes(b"not parquet at all")
    assert load_error(path).startswith(f"{path}: not a readable Parquet file (")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    assert load_error(path) == f"{path}: no such file"
    with pytest.raises(SeedFormatError, match="nowhere.jsonl: no such file"):
        seed_file_sha256(path)


def test_seed_file_sha256_hashes_the_bytes(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(b"abc")
    assert seed_file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    path.write_bytes(b"abd")
    assert seed_file_sha256(path) != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- the demo seed sets -------------------------------------------------------------------------


@pytest.mark.parametrize(("language", "minimum"), [("en", 40), ("ko", 30)])
def test_demo_seeds_load_and_pass_the_pipeline_filters(language, minimum):
    tasks = load_seed_tasks(demo_seed_path(language))
    assert len(tasks) >= minimum
    assert all(t.name and t.id for t in tasks)
    assert len({t.instruction for t in tasks}) == len(tasks)
    classification = sum(t.is_classification for t in tasks)
    assert 0.15 <= classification / len(tasks) <= 0.35
    for t in tasks:
        assert filter_instruction(t.instruction, language=language) is None, t.instruction
        assert len(t.instances) == 3, t.id
        kept, counts, dropped = filter_instances(list(t.instances))
        assert (kept, dropped) == (list(t.instances), False), (t.id, counts)


def test_korean_demo_seeds_are_korean():
    tasks = load_seed_tasks(demo_seed_path("ko"))
    # The paper's English first-character rule would reject every one of them.
    assert all(filter_instruction(t.instruction, language="en") == "bad_first_char"
               for t in tasks if not t.instruction[0].isdigit())


def test_unknown_demo_language():
    with pytest.raises(ValueError, match="no demo seed set"):
        demo_seed_path("fr")


def test_a_pretty_printed_json_object_is_explained(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps({"tasks": [task()]}, indent=2), encoding="utf-8")
    assert load_error(path) == (f"{path}: holds one JSON object over several lines; expected one object a line "
                                "(JSON Lines) or a JSON list of objects")
