"""Tests of the offline demo corpus: stdlib docstrings plus rendered seed tasks.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/tasks/pretrain/test_demo_corpus.py
"""

from __future__ import annotations

import json

import pytest

from tasks.pretrain.cleaning import CleaningConfig, clean_corpus
from tasks.pretrain.corpus import CorpusError, read_corpus
from tasks.pretrain.demo_corpus import (
    MIN_DOCSTRING_CHARS,
    SKIPPED_PARTS,
    build_demo_corpus,
    stdlib_files,
    stdlib_root,
)

SEEDS = [
    {
        "id": "seed_task_0",
        "name": "breakfast_suggestion",
        "instruction": "Is there anything I can eat for a breakfast that doesn't include eggs?",
        "instances": [{"input": "", "output": "Yes, oatmeal with fruit, or yogurt with granola."}],
        "is_classification": False,
    },
    {
        "id": "seed_task_1",
        "name": "sentiment",
        "instruction": "Classify the sentiment of the sentence.",
        "instances": [
            {"input": "I loved this film.", "output": "Positive"},
            {"input": "The food was cold.", "output": "Negative"},
        ],
        "is_classification": True,
    },
]


def write_seeds(path, tasks=SEEDS):
    path.write_text("".join(json.dumps(task) + "\n" for task in tasks), encoding="utf-8")
    return path


def read_texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_builds_jsonl_of_stdlib_docstrings(tmp_path):
    out = build_demo_corpus(tmp_path / "demo" / "corpus.jsonl", max_documents=40)
    assert out == tmp_path / "demo" / "corpus.jsonl"
    texts = read_texts(out)
    assert len(texts) == 40
    assert all(len(text) >= MIN_DOCSTRING_CHARS for text in texts)
    # Docstrings are cleaned (no common leading indentation) and are English prose.
    assert all(not text.startswith((" ", "\t")) for text in texts)
    assert sum(" the " in text for text in texts) > 20
    # Nothing but the corpus is left in the folder: the temporary file was renamed.
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.jsonl"]
    assert out.stat().st_mode & 0o777 == 0o644
    # The project's own reader takes it as it is.
    assert [d.text for d in read_corpus([str(out)])] == texts


def test_build_is_deterministic(tmp_path):
    first = build_demo_corpus(tmp_path / "a.jsonl", max_documents=60)
    second = build_demo_corpus(tmp_path / "b.jsonl", max_documents=60)
    assert first.read_bytes() == second.read_bytes()


def test_stdlib_files_skip_tests_and_tools_and_are_sorted():
    root = stdlib_root()
    files = stdlib_files()
    relative = [path.relative_to(root).as_posix() for path in files]
    assert relative == sorted(relative)
    assert "textwrap.py" in relative
    assert not any(SKIPPED_PARTS.intersection(path.relative_to(root).parts[:-1]) for path in files)


def test_extra_documents_are_appended_and_survive_cleaning(tmp_path):
    extra = ["Instruction: Name three fruits that are red.\nOutput: Strawberries, cherries and raspberries.",
             "Task: Classify the sentiment of the sentence.\nClass label: Positive\nInput: I loved this film."]
    out = build_demo_corpus(tmp_path / "corpus.jsonl", max_documents=30, extra_documents=extra)
    texts = read_texts(out)
    assert len(texts) == 32
    assert texts[30:] == extra
    cleaned = clean_corpus(texts, CleaningConfig())
    assert all(doc in cleaned.texts for doc in texts[30:])
    # The docstrings are real prose: the default cleaning keeps most of them.
    assert len(cleaned.texts) >= 0.8 * len(texts)


def test_max_documents_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_documents must be at least 1"):
        build_demo_corpus(tmp_path / "c.jsonl", max_documents=0)
