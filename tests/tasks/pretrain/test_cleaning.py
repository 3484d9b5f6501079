"""Tests of corpus cleaning: each rule, the PII scrub, deduplication, the funnel, determinism.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest tests/tasks/pretrain/test_cleaning.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tasks.pretrain.cleaning import (
    PII_KINDS,
    REMOVAL_RULES,
    CleaningConfig,
    EmptyCorpusError,
    clean_corpus,
    duplicate_line_fraction,
    find_near_duplicates,
    jaccard,
    minhash_signatures,
    ngram_hashes,
    require_nonempty,
    scrub_pii,
    symbol_ratio,
)
from tasks.pretrain.corpus import Document

REPO = Path(__file__).resolve().parents[3]

PROSE = [
    "The tokenizer splits text into pieces that the model can embed and predict one at a time.",
    "A held-out split measures how well the model generalises to text it has never seen before.",
    "Gradient accumulation lets a small machine train with the effective batch size of a large one.",
    "Checkpoints are written periodically so that an interrupted run can resume where it stopped.",
]

# About sixty words: long enough that changing one word keeps the 5-gram Jaccard above 0.8.
LONG_DOC = (
    "Python is a programming language that lets you work quickly and integrate systems more "
    "effectively. It supports multiple programming paradigms, including structured, object oriented "
    "and functional programming. It is often described as a batteries included language because of "
    "its comprehensive standard library. Guido van Rossum began working on Python in the late 1980s "
    "as a successor to the ABC programming language and first released it in 1991 as Python 0.9.0."
)


def loose(**overrides) -> CleaningConfig:
    """A config with every quality rule off, to test one rule at a time."""
    base = dict(min_chars=0, max_chars=1_000_000, max_symbol_ratio=1.0, max_duplicate_line_fraction=1.0)
    base.update(overrides)
    return CleaningConfig(**base)


def assert_funnel_adds_up(result, n_input: int) -> None:
    funnel = result.funnel_dict()
    assert funnel["input"] == n_input
    assert funnel["input"] - sum(funnel[rule] for rule in REMOVAL_RULES) == funnel["output"]
    assert funnel["output"] == len(result.texts) == len(result.kept_indices)


# --- config --------------------------------------------------------------------------------


def test_every_config_field_has_a_description():
    for name, field in CleaningConfig.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"min_chars": 500, "max_chars": 100}, "min_chars (500) must not exceed max_chars (100)"),
        ({"max_symbol_ratio": 1.5}, "max_symbol_ratio"),
        ({"max_duplicate_line_fraction": -0.1}, "max_duplicate_line_fraction"),
        ({"near_dup_threshold": 0.0}, "near_dup_threshold"),
        ({"near_dup_ngram": 0}, "near_dup_ngram"),
        ({"minhash_permutations": 128, "lsh_bands": 30}, "lsh_bands (30) must divide minhash_permutations (128)"),
        ({"min_chars": -1}, "min_chars"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_invalid_config_values_name_the_field(values, fragment):
    with pytest.raises(ValidationError) as info:
        CleaningConfig(**values)
    assert fragment in str(info.value)


# --- quality rules -------------------------------------------------------------------------


def test_too_short_and_too_long():
    texts = ["Hi.", PROSE[0], "word " * 100]
    result = clean_corpus(texts, loose(min_chars=10, max_chars=200))
    assert result.texts == [PROSE[0]]
    funnel = result.funnel_dict()
    assert (funnel["too_short"], funnel["too_long"]) == (1, 1)
    assert_funnel_adds_up(result, 3)


def test_symbol_ratio_removes_markup_and_keeps_prose():
    table = "+----+----+\n| a  | b  |\n+====+====+\n| 1  | 2  |\n+----+----+"
    assert symbol_ratio(table) > 0.5
    assert symbol_ratio(PROSE[0]) < 0.05
    assert symbol_ratio("") == 0.0
    result = clean_corpus([table, PROSE[0]], loose(max_symbol_ratio=0.3))
    assert result.texts == [PROSE[0]]
    assert result.funnel_dict()["symbol_ratio"] == 1


def test_repeated_lines_fraction_and_rule():
    spam = "Buy now!\nBuy now!\nBuy now!\nLimited offer.\nBuy now!"
    # Five lines, three repeat an earlier one.
    assert duplicate_line_fraction(spam) == pytest.approx(3 / 5)
    assert duplicate_line_fraction("one line only") == 0.0
    assert duplicate_line_fraction("a\n\n\nb") == 0.0
    result = clean_corpus([spam, "\n".join(PROSE)], loose(max_duplicate_line_fraction=0.3))
    assert result.texts == ["\n".join(PROSE)]
    assert result.funnel_dict()["repeated_lines"] == 1


def test_each_document_counts_under_the_first_rule_it_fails():
    # Short and symbol-heavy: counted as too_short only.
    result = clean_corpus(["#$%"], loose(min_chars=10, max_symbol_ratio=0.1))
    funnel = result.funnel_dict()
    assert (funnel["too_short"], funnel["symbol_ratio"]) == (1, 0)


def test_default_config_keeps_plain_prose():
    result = clean_corpus(PROSE)
    assert result.texts == PROSE
    assert result.kept_indices == [0, 1, 2, 3]


# --- duplicates ----------------------------------------------------------------------------


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first():
    texts = [PROSE[0], PROSE[1], "  " + PROSE[0].upper().replace(" ", "   \n ") + "\n", PROSE[1]]
    result = clean_corpus(texts, loose(near_dedup=False))
    assert result.texts == [PROSE[0], PROSE[1]]
    assert result.kept_indices == [0, 1]
    assert result.funnel_dict()["exact_duplicate"] == 2


def test_near_duplicate_with_one_word_changed_is_removed():
    changed = LONG_DOC.replace("comprehensive", "extensive")
    assert changed != LONG_DOC
    result = clean_corpus([LONG_DOC, PROSE[0], changed, PROSE[1]], loose())
    assert result.texts == [LONG_DOC, PROSE[0], PROSE[1]]
    funnel = result.funnel_dict()
    assert (funnel["exact_duplicate"], funnel["near_duplicate"]) == (0, 1)
    # The exact Jaccard of the pair is what decides: at a threshold above it the pair stays.
    similarity = jaccard(ngram_hashes(LONG_DOC, 5), ngram_hashes(changed, 5))
    assert 0.8 <= similarity < 1.0
    kept = clean_corpus([LONG_DOC, changed], loose(near_dup_threshold=min(1.0, similarity + 0.01)))
    assert kept.texts == [LONG_DOC, changed]


def test_distinct_documents_sharing_a_phrase_are_kept():
    shared = "as described in the documentation of the standard library"
    texts = [f"{p} This is {shared}." for p in PROSE]
    result = clean_corpus(texts, loose())
    assert result.texts == texts


def test_near_dedup_can_be_switched_off():
    changed = LONG_DOC.replace("quickly", "rapidly")
    assert clean_corpus([LONG_DOC, changed], loose(near_dedup=False)).texts == [LONG_DOC, changed]


def test_lsh_finds_planted_near_duplicates_among_many_documents():
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(5000)]
    originals = [" ".join(rng.choice(vocabulary) for _ in range(80)) for _ in range(1500)]
    planted = {}
    texts = list(originals)
    for source in rng.sample(range(len(originals)), 40):
        words = originals[source].split()
        words[rng.randrange(len(words))] = "changed"
        planted[len(texts)] = source
        texts.append(" ".join(words))
    duplicates = find_near_duplicates(texts, ngram=5, threshold=0.8)
    assert duplicates == set(planted)


def test_minhash_agreement_estimates_jaccard():
    rng = random.Random(3)
    words = [f"t{i}" for i in range(400)]
    a = " ".join(words)
    b = " ".join(words[:300] + [f"u{i}" for i in range(100)])
    sa, sb = ngram_hashes(a, 3), ngram_hashes(b, 3)
    true = jaccard(sa, sb)
    signatures = minhash_signatures([sa, sb], permutations=512, seed=rng.randrange(100))
    estimate = float(np.mean(signatures[0] == signatures[1]))
    assert abs(estimate - true) < 0.08


def test_ngram_hashes_are_order_sensitive_and_short_texts_form_one_ngram():
    assert len(ngram_hashes("one two three", 5)) == 1
    assert len(ngram_hashes("", 5)) == 0
    assert not np.array_equal(ngram_hashes("a b c d e f", 5), ngram_hashes("f e d c b a", 5))
    # Casefolded words: punctuation and case do not matter.
    assert np.array_equal(ngram_hashes("Hello, World!", 2), ngram_hashes("hello world", 2))


# --- PII -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Write to guido@python.org for details.", "Write to <EMAIL> for details.", "pii_email"),
        ("Contact jane.doe+news@mail.example.co.uk today", "Contact <EMAIL> today", "pii_email"),
        ("Call +1 (555) 123-4567 now.", "Call <PHONE> now.", "pii_phone"),
        ("Office: +44 20 7946 0958.", "Office: <PHONE>.", "pii_phone"),
        ("Paris +33 1 23 45 67 89", "Paris <PHONE>", "pii_phone"),
        ("US 555-123-4567 or 555.123.4567", "US <PHONE> or <PHONE>", "pii_phone"),
        ("Ring (555) 123-4567.", "Ring <PHONE>.", "pii_phone"),
        ("London 020 7946 0958, mobile 07700 900123", "London <PHONE>, mobile <PHONE>", "pii_phone"),
        ("The server is at 192.168.1.10.", "The server is at <IP>.", "pii_ip"),
        ("Ping 8.8.8.8 and 10.0.0.255 often", "Ping <IP> and <IP> often", "pii_ip"),
        ("IPv6 2001:db8::ff00:42:8329 here", "IPv6 <IP> here", "pii_ip"),
        ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "full <IP>.", "pii_ip"),
        ("mapped ::ffff:192.0.2.1 and link fe80::1", "mapped <IP> and link <IP>", "pii_ip"),
        ("key sk-proj-Ab3dEf9hIjKlMnOpQrStUvWx", "key <API_KEY>", "pii_api_key"),
        ("token ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef1234", "token <API_KEY>", "pii_api_key"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws <API_KEY>", "pii_api_key"),
        ("sha e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha <API_KEY>", "pii_api_key"),
        ("secret aZ9xQ2mL7pR4tV1wY8bN3cK6dF0gH5jS", "secret <API_KEY>", "pii_api_key"),
    ],
)
def test_pii_is_replaced_and_counted(text, expected, kind):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == expected
    assert counts[kind] == expected.count("<") and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize(
    "text",
    [
        "Python 1.0 came out in 1999, and Python 3.11.7 in 2023.",
        "On 2023-01-15 at 12:30:45 we counted 12345678 rows and 1,234,567 users.",
        "pi is 3.14159265358979 and the ratio is 16:9; ISBN 978-3-16-148410-0.",
        "Values 256.1.1.1, 1.2.3.4.5 and version v1.2.3.4 are not addresses.",
        "Slices x[1::2] and a[::3] and the reST marker Example:: stay.",
        "The MAC 00:1a:2b:3c:4d:5e, zip code 10115 and range 1990-2000 stay.",
        "Identifiers test_something_very_long_function_name_here and AbstractAsynchronousContextManagerFactory.",
        "sk-learn-compatible-estimators-are-great is a phrase, not a key.",
        "Decimal('+35236450.6') is a signed number.",
    ],
)
def test_pii_negatives_are_left_alone(text):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == text
    assert sum(counts.values()) == 0


def test_pii_counts_in_the_funnel_and_documents_are_kept():
    texts = [
        "Mail alice@example.com or bob@example.org about the release schedule.",
        "The build server at 10.1.2.3 posts results to the team every night.",
        "Nothing personal in this sentence about compilers and interpreters.",
    ]
    result = clean_corpus(texts, loose())
    funnel = result.funnel_dict()
    assert (funnel["pii_email"], funnel["pii_ip"], funnel["pii_phone"], funnel["pii_api_key"]) == (2, 1, 0, 0)
    assert result.texts[0] == "Mail <EMAIL> or <EMAIL> about the release schedule."
    assert len(result.texts) == 3
    assert_funnel_adds_up(result, 3)


def test_documents_differing_only_in_pii_collapse_as_duplicates():
    texts = [
        "Please send the quarterly report to alice@example.com before Friday.",
        "Please send the quarterly report to bob@example.org before Friday.",
    ]
    assert len(clean_corpus(texts, loose()).texts) == 1
    unscrubbed = clean_corpus(texts, loose(scrub_pii=False))
    assert unscrubbed.texts == texts
    assert all(unscrubbed.funnel_dict()[kind] == 0 for kind in PII_KINDS)


# --- funnel, inputs, empty results -----------------------------------------------------------


def test_funnel_order_and_sums_on_a_mixed_corpus():
    changed = LONG_DOC.replace("quickly", "rapidly")
    texts = [
        "Too short.",  # too_short
        "x" * 2000,  # too_long
        "<<<>>> {{{}}} [[[]]] ((())) ### $$$ %%%",  # symbol_ratio
        "same line here\nsame line here\nsame line here\nanother line",  # repeated_lines
        LONG_DOC,
        LONG_DOC.upper(),  # exact_duplicate
        changed,  # near_duplicate
        PROSE[0] + " Mail ops@example.com.",
    ]
    config = CleaningConfig(min_chars=20, max_chars=1000, max_symbol_ratio=0.3, max_duplicate_line_fraction=0.3)
    result = clean_corpus(texts, config)
    names = [name for name, _ in result.funnel]
    assert names == ["input", *REMOVAL_RULES, *PII_KINDS, "output"]
    funnel = result.funnel_dict()
    assert [funnel[rule] for rule in REMOVAL_RULES] == [1, 1, 1, 1, 1, 1]
    assert funnel["pii_email"] == 1
    assert result.kept_indices == [4, 7]
    assert_funnel_adds_up(result, len(texts))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from("ab c\n.!@1"), max_size=60),
        max_size=25,
    )
)
def test_funnel_always_adds_up(texts):
    result = clean_corpus(texts, CleaningConfig(min_chars=3, max_chars=50, near_dup_ngram=2))
    assert_funnel_adds_up(result, len(texts))
    # Every kept text is its input, scrubbed and stripped, in input order.
    assert result.kept_indices == sorted(result.kept_indices)
    assert result.texts == [scrub_pii(texts[i])[0].strip() for i in result.kept_indices]


def test_documents_are_accepted_and_order_is_kept():
    docs = [Document(text, "corpus.jsonl", line=i + 1) for i, text in enumerate(PROSE)]
    assert clean_corpus(list(reversed(docs))).texts == list(reversed(PROSE))


def test_empty_input_is_not_an_error():
    result = clean_corpus([])
    assert result.texts == []
    assert result.funnel_dict()["input"] == 0 and result.funnel_dict()["output"] == 0


def test_require_nonempty_names_sources_and_funnel():
    result = clean_corpus(["tiny", "also tiny"], CleaningConfig(min_chars=50))
    with pytest.raises(EmptyCorpusError) as info:
        require_nonempty(result, ["data/a.jsonl", "data/*.txt"])
    message = str(info.value)
    assert "data/a.jsonl, data/*.txt" in message
    assert "input=2" in message and "too_short=2" in message and "output=0" in message
    assert issubclass(EmptyCorpusError, ValueError)
    kept = clean_corpus(PROSE)
    assert require_nonempty(kept, ["x"]) is kept


# --- determinism -----------------------------------------------------------------------------


def test_cleaning_is_deterministic_and_independent_of_the_hash_seed(tmp_path):
    rng = random.Random(11)
    vocabulary = [f"v{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(40)) for _ in range(200)]
    texts += [t.replace(t.split()[3], "swap", 1) for t in texts[:30]]
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    script = (
        "import json, sys\n"
        "from tasks.pretrain.cleaning import CleaningConfig, clean_corpus, minhash_signatures, ngram_hashes\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "result = clean_corpus(texts, CleaningConfig(min_chars=1, lsh_bands=64))\n"
        "sig = minhash_signatures([ngram_hashes(t, 5) for t in texts[:5]], 64, 0)\n"
        "print(json.dumps([result.kept_indices, result.funnel, sig.tolist()]))\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        run = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "texts.json")],
            env=env, capture_output=True, text=True, check=True, cwd=REPO,
        )
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    kept_indices, funnel, _ = json.loads(outputs[0])
    assert dict(funnel)["near_duplicate"] > 0
    # In-process runs agree with the subprocesses too.
    assert clean_corpus(texts, CleaningConfig(min_chars=1, lsh_bands=64)).kept_indices == kept_indices
