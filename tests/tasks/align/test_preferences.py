"""Preference pairs: sampling from the SFT model and the reference, llm, human and file judges."""

from __future__ import annotations

import re
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.align.config import PreferenceOptions
from tasks.align.data import load_sft_table
from tasks.align.preferences import (
    PREFERENCE_SCHEMA,
    PreferenceError,
    build_preferences,
    judge_by_reference,
    load_preference_file,
    parse_verdict,
    preference_stats,
    rouge_l,
    sample_responses,
)
from tasks.generation.params import Completion, DecodingParams, Generator

COLUMNS = ["prompt", "chosen", "rejected", "judge", "chosen_score", "rejected_score", "chosen_len", "rejected_len"]


class RuleJudge(Generator):
    """A deterministic judge backend that reads the A/B judge prompt and answers by a rule.

    rule(a, b) -> "A" | "B" sees the two responses as shown; `position_biased` always answers "A".
    """

    def __init__(self, rule):
        self.rule = rule
        self.calls = 0

    def identity(self) -> dict[str, Any]:
        return {"backend": "rule"}

    def complete(self, prompts: Sequence[str], params: DecodingParams) -> list[Completion]:
        raise NotImplementedError

    def chat(self, conversations: Sequence[list[dict]], params: DecodingParams) -> list[Completion]:
        self.calls += 1
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            a = re.search(r"Response A:\n(.*?)\n\nResponse B:", text, re.S).group(1)
            b = re.search(r"Response B:\n(.*?)\n\nAnswer with", text, re.S).group(1)
            out.append(Completion(text=f"{self.rule(a, b)}", finish_reason="stop", completion_tokens=1))
        return out


class FixedSamples(Generator):
    """A sampler backend that answers prompt i with a fixed list of K responses (for judge logic tests)."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.served: dict[str, int] = {}

    def identity(self) -> dict[str, Any]:
        return {"backend": "fixed"}

    def complete(self, prompts, params):
        raise NotImplementedError

    def chat(self, conversations, params):
        out = []
        for conversation in conversations:
            prompt = conversation[-1]["content"]
            i = self.served.get(prompt, 0)
            self.served[prompt] = i + 1
            out.append(Completion(text=self.answers[prompt][i], finish_reason="stop", completion_tokens=3))
        return out


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for reference, candidate in [
        ("The capital of France is Paris.", "The capital of France is Rome."),
        ("apple apple apple", "apple"),
        ("Hello, Anna! Nice to meet you.", "Nice to meet you, Anna."),
        ("one two", "three four"),
    ]:
        assert rouge_l(reference, candidate) == pytest.approx(scorer.score(reference, candidate)["rougeL"].fmeasure)


def test_reference_judge_rejects_the_farthest_samples_and_never_the_reference():
    reference = "The capital of France is Paris."
    samples = ["The capital of France is Rome.", "Paris.", "I like cats.", reference, "Paris."]
    pairs = judge_by_reference("Capital of France?", reference, samples, pairs_per_prompt=2)
    assert [(p.chosen, p.rejected) for p in pairs] == [(reference, "I like cats."), (reference, "Paris.")]
    assert [p.rejected_score for p in pairs] == [0.0, pytest.approx(rouge_l(reference, "Paris."))]
    assert all(p.chosen_score == 1.0 and p.judge == "reference" for p in pairs)
    # Too few distinct samples: best vs worst sample fills in (2 samples -> 3 pairs).
    pairs = judge_by_reference("q", reference, ["The capital is Paris.", "No."], pairs_per_prompt=3)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (reference, "No."), (reference, "The capital is Paris."), ("The capital is Paris.", "No.")
    ]
    # Every sample equals the reference: nothing to prefer.
    assert judge_by_reference("q", reference, [reference, reference + " "], pairs_per_prompt=2) == []


def test_build_preferences_reference_judge_from_fixed_samples():
    table = pa.Table.from_pylist(
        [{"prompt": "Say hello to Anna.", "completion": "Hello, Anna! Nice to meet you."},
         {"prompt": "Count from 1 to 3.", "completion": "1, 2, 3"}]
    )
    sampler = FixedSamples({
        "Say hello to Anna.": ["Hello, Anna!", "Goodbye.", "Hello, Anna! Nice to meet you."],
        "Count from 1 to 3.": ["1, 2", "1, 2, 3", "4, 5, 6"],
    })
    result = build_preferences(table, PreferenceOptions(num_samples=3, pairs_per_prompt=2), generator=sampler, log=lambda s: None)
    assert result.schema == PREFERENCE_SCHEMA and result.column_names == COLUMNS
    rows = result.to_pylist()
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("Say hello to Anna.", "Hello, Anna! Nice to meet you.", "Goodbye."),
        ("Say hello to Anna.", "Hello, Anna! Nice to meet you.", "Hello, Anna!"),
        ("Count from 1 to 3.", "1, 2, 3", "4, 5, 6"),
        ("Count from 1 to 3.", "1, 2, 3", "1, 2"),
    ]
    assert all(r["chosen_len"] == len(r["chosen"]) and r["rejected_len"] == len(r["rejected"]) for r in rows)
    assert preference_stats(result)["pairs_per_prompt"] == 2.0


@pytest.mark.slow
def test_reference_judge_on_samples_of_the_sft_model(sft_model_dir, instruction_data):
    from tasks.generation.local import LocalGenerator

    table = load_sft_table(instruction_data["eval"])
    options = PreferenceOptions(
        num_samples=4, pairs_per_prompt=2, max_prompts=12,
        decoding=DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=24, seed=0),
    )
    with LocalGenerator(sft_model_dir, "sft", batch_size=16, device="cpu") as sampler:
        samples = sample_responses(sampler, table.column("prompt").to_pylist()[:3], 4, options.decoding)
        result = build_preferences(table, options, generator=sampler, log=lambda s: None)
        again = build_preferences(table, options, generator=sampler, log=lambda s: None)
    assert [len(group) for group in samples] == [4, 4, 4]
    assert result.equals(again), "same seed, same pairs"
    references = dict(zip(table.column("prompt").to_pylist(), table.column("completion").to_pylist()))
    rows = result.to_pylist()
    assert len({r["prompt"] for r in rows}) >= 10
    counts = {p: sum(r["prompt"] == p for r in rows) for p in {r["prompt"] for r in rows}}
    assert sum(c >= 2 for c in counts.values()) >= 0.8 * len(counts), counts
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert row["chosen_score"] > row["rejected_score"]
        assert row["rejected_score"] == pytest.approx(rouge_l(references[row["prompt"]], row["rejected"]))


def test_llm_judge_keeps_a_pair_only_when_both_orders_agree():
    table = pa.Table.from_pylist([{"prompt": f"Say hello to {n}.", "completion": f"Hello, {n}!"} for n in ("Anna", "Ben")])
    samples = {
        "Say hello to Anna.": ["Hello, Anna!", "Go away.", "Hi."],
        "Say hello to Ben.": ["Hello, Ben!", "Go away.", "Hi."],
    }
    # A consistent judge: prefers the answer that contains "Hello", else the shorter one.
    def consistent(a: str, b: str) -> str:
        if ("Hello" in a) != ("Hello" in b):
            return "A" if "Hello" in a else "B"
        return "A" if len(a) <= len(b) else "B"

    options = PreferenceOptions(judge="llm", num_samples=3, pairs_per_prompt=2)
    lines: list[str] = []
    result = build_preferences(table, options, generator=FixedSamples(samples), judge_generator=RuleJudge(consistent), log=lines.append)
    rows = result.to_pylist()
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("Hello, Anna!", "Go away."), ("Hello, Anna!", "Hi."), ("Hello, Ben!", "Go away."), ("Hello, Ben!", "Hi."),
    ]
    assert {r["judge"] for r in rows} == {"llm"}

    # A judge that always says "A" contradicts itself once the order is swapped: no pair survives.
    position_biased = RuleJudge(lambda a, b: "A")
    with pytest.raises(PreferenceError, match="produced no preference pairs"):
        build_preferences(table, options, generator=FixedSamples(samples), judge_generator=position_biased, log=lines.append)
    assert any("0 agreed in both orders" in line for line in lines)


def test_llm_length_bias_control_drops_pairs_won_by_length():
    table = pa.Table.from_pylist([{"prompt": "Describe the sea.", "completion": "Blue."}])
    samples = {"Describe the sea.": ["Blue and wide and deep and endless.", "Blue.", ""]}
    longer_wins = RuleJudge(lambda a, b: "A" if len(a) >= len(b) else "B")
    base = PreferenceOptions(judge="llm", num_samples=3, pairs_per_prompt=3)
    plain = build_preferences(table, base, generator=FixedSamples(samples), judge_generator=longer_wins, log=lambda s: None)
    assert len(plain) == 3 and preference_stats(plain)["chosen_longer_fraction"] == 1.0

    controlled = base.model_copy(update={"length_bias_control": True, "max_length_ratio": 1.5})
    kept = build_preferences(table, controlled, generator=FixedSamples(samples), judge_generator=longer_wins, log=lambda s: None)
    # "Blue and wide..." over "Blue." is 7x longer: dropped. Anything over an empty answer: kept.
    assert sorted((r["chosen"], r["rejected"]) for r in kept.to_pylist()) == [
        ("Blue and wide and deep and endless.", ""), ("Blue.", ""),
    ]


def test_parse_verdict():
    assert parse_verdict("A") == "A"
    assert parse_verdict(" B is better") == "B"
    assert parse_verdict("Answer: A.") == "A"
    assert parse_verdict("Both are fine") is None


def test_human_judge_records_the_persons_choice_in_random_positions():
    table = pa.Table.from_pylist([{"prompt": "Say hello to Anna.", "completion": "Hello, Anna!"},
                                  {"prompt": "Say hello to Ben.", "completion": "Hello, Ben!"}])
    samples = {"Say hello to Anna.": ["Go away.", "Hello, Anna!"], "Say hello to Ben.": ["Hello, Ben!", "Go away."]}
    shown: list[tuple[str, str, str]] = []

    def person(prompt: str, a: str, b: str) -> str:
        shown.append((prompt, a, b))
        if prompt == "Say hello to Ben.":
            return "skip"
        return "A" if a.startswith("Hello") else "B"

    options = PreferenceOptions(judge="human", num_samples=2, pairs_per_prompt=1, seed=3)
    result = build_preferences(table, options, generator=FixedSamples(samples), ask=person, log=lambda s: None)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["judge"]) for r in result.to_pylist()] == [
        ("Say hello to Anna.", "Hello, Anna!", "Go away.", "human")
    ]
    assert [s[0] for s in shown] == ["Say hello to Anna.", "Say hello to Ben."]

    with pytest.raises(PreferenceError, match="answer must be 'A', 'B' or 'skip', got 'maybe'"):
        build_preferences(table, options, generator=FixedSamples(samples), ask=lambda p, a, b: "maybe", log=lambda s: None)


def test_file_judge_imports_labels_and_names_bad_files(tmp_path):
    good = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["good"], "rejected": ["bad"]}), good)
    result = build_preferences(None, PreferenceOptions(judge="file", labels_path=str(good)), log=lambda s: None)
    assert result.to_pylist() == [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "judge": "file", "chosen_score": None,
         "rejected_score": None, "chosen_len": 4, "rejected_len": 3}
    ]

    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "better": ["good"]}), missing)
    with pytest.raises(PreferenceError, match=r"missing\.parquet: field 'chosen': missing column \(also missing: rejected; columns present: prompt, better\)$"):
        build_preferences(None, PreferenceOptions(judge="file", labels_path=str(missing)), log=lambda s: None)

    null_field = tmp_path / "null.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": ["a", None], "rejected": ["b", "c"]}), null_field)
    with pytest.raises(PreferenceError, match=r"null\.parquet: row 2: field 'chosen': expected a string, got null$"):
        load_preference_file(null_field)
    empty_prompt = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": ["p", " "], "chosen": ["a", "b"], "rejected": ["", "c"]}), empty_prompt)
    with pytest.raises(PreferenceError, match=r"empty\.parquet: row 2: field 'prompt': is empty$"):
        load_preference_file(empty_prompt)

    with pytest.raises(PreferenceError, match="judge 'file' needs labels_path"):
        build_preferences(None, PreferenceOptions(judge="file"), log=lambda s: None)
    with pytest.raises(PreferenceError, match=r"nope\.parquet: no such file$"):
        load_preference_file(tmp_path / "nope.parquet")
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "x ", "rejected": "x"}\n')
    with pytest.raises(PreferenceError, match=r"same\.jsonl: line 2: field 'rejected': the same text as 'chosen'$"):
        load_preference_file(same)
    scores = tmp_path / "scores.json"
    scores.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": "high"}]')
    with pytest.raises(PreferenceError, match=r"scores\.json: row 1 \(line 1\): field 'chosen_score': expected a number, got string \('high'\)$"):
        load_preference_file(scores)
    good_jsonl = tmp_path / "labels.jsonl"
    good_jsonl.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad", "chosen_score": 1}\n')
    assert load_preference_file(good_jsonl).to_pylist()[0]["chosen_score"] == 1.0


def test_judges_that_need_a_backend_say_so():
    table = pa.Table.from_pylist([{"prompt": "p", "completion": "c"}])
    sampler = FixedSamples({"p": ["a", "b"]})
    with pytest.raises(PreferenceError, match="judge 'llm' needs judge_generator"):
        build_preferences(table, PreferenceOptions(judge="llm", num_samples=2), generator=sampler)
    with pytest.raises(PreferenceError, match="judge 'human' needs an ask"):
        build_preferences(table, PreferenceOptions(judge="human", num_samples=2), generator=sampler)
    with pytest.raises(PreferenceError, match="needs a generator"):
        build_preferences(table, PreferenceOptions())
