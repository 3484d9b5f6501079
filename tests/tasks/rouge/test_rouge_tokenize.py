"""The tokenizers: `rouge` is rouge-score's tokenizer exactly; `unicode` handles any script."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import tokenizers

from tasks.rouge.tokenize import make_batch_tokenizer, make_tokenizer, tokenize

TRICKY = [
    "",
    "   ",
    "!!! ... ???",
    "Hello, World! It's 2024; e-mail me at x@y.z",
    "café naïve résumé",
    "İstanbul \u212a Kelvin ǅ digraph",  # lower() changes these in surprising ways
    "snake_case and CamelCase and x2y3",
    "한국어 문장을 번역하세요",
    "日本語のテキスト、カタカナ。",
    "running runners ran quickly; generously, happily organized",
    "tab\tnew\nline\r\nend",
]


@pytest.mark.parametrize("stemming", [False, True])
@pytest.mark.parametrize("text", TRICKY)
def test_rouge_tokenizer_matches_rouge_score(text: str, stemming: bool) -> None:
    expected = tokenizers.DefaultTokenizer(use_stemmer=stemming).tokenize(text)
    assert make_tokenizer("rouge", stemming)(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), st.booleans())
def test_rouge_tokenizer_matches_rouge_score_on_random_text(text: str, stemming: bool) -> None:
    expected = tokenizers.DefaultTokenizer(use_stemmer=stemming).tokenize(text)
    assert make_tokenizer("rouge", stemming)(text) == expected


def test_rouge_tokenizer_drops_non_ascii_letters() -> None:
    assert tokenize("한국어 문장") == []
    assert tokenize("日本語") == []
    assert tokenize("café") == ["caf"]


def test_unicode_tokenizer_splits_cjk_per_character_and_keeps_korean_words() -> None:
    assert tokenize("한국어 문장을 번역하세요.", "unicode") == ["한국어", "문장을", "번역하세요"]
    assert tokenize("日本語のテキスト", "unicode") == ["日", "本", "語", "の", "テ", "キ", "ス", "ト"]
    assert tokenize("中文句子 and English", "unicode") == ["中", "文", "句", "子", "and", "english"]
    assert tokenize("Café naïve snake_case x2", "unicode") == ["café", "naïve", "snake", "case", "x2"]
    assert tokenize("!!! ...", "unicode") == []


def test_unicode_tokenizer_stems_only_ascii_words() -> None:
    assert tokenize("running 달리는 cafés", "unicode", stemming=True) == ["run", "달리는", "cafés"]


def test_unknown_tokenizer_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer 'spacy'"):
        make_tokenizer("spacy")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
            st.text(alphabet="aB3 .,!\x00\t_-\x1c", max_size=30),  # ASCII: the joined fast path
        ),
        max_size=8,
    ),
    st.sampled_from(["rouge", "unicode"]),
    st.booleans(),
)
def test_batch_tokenizer_gives_each_text_its_own_tokens(texts: list[str], name: str, stemming: bool) -> None:
    # The rouge fast path lowers and splits the texts joined by NUL: a text holding a NUL, or
    # a non-ASCII one, must still get exactly the per-text tokens.
    expected = [make_tokenizer(name, stemming)(text) for text in texts]
    assert make_batch_tokenizer(name, stemming)(texts) == expected
    if name == "rouge":
        assert expected == [tokenizers.DefaultTokenizer(use_stemmer=stemming).tokenize(t) for t in texts]


def test_batch_tokenizer_ascii_block_and_non_str() -> None:
    batch = make_batch_tokenizer()
    assert batch(["Write a POEM!", "", "x_y\tz", "42 is 42."]) == [["write", "a", "poem"], [], ["x", "y", "z"], ["42", "is", "42"]]
    assert batch([]) == []
    with pytest.raises(AttributeError):
        batch(["fine", None])  # type: ignore[list-item]
