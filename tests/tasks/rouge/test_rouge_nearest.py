"""`nearest` against rouge-score itself: the highest score and the first pool item reaching it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from tasks.rouge.engine import nearest

SCORER = rouge_scorer.RougeScorer(["rougeL"])
WORDS = ["a", "b", "c", "the", "of", "write", "poem", "x1", "42"]
ODD_ITEMS = ["", "!!!", "café", "日本語", "a", "the"]
texts = st.lists(st.one_of(st.sampled_from(ODD_ITEMS), st.lists(st.sampled_from(WORDS), max_size=9).map(" ".join)), max_size=12)


def reference_nearest(texts: list[str], pool: list[str]) -> list[tuple[float, int | None]]:
    out = []
    for text in texts:
        scores = [SCORER.score(text, item)["rougeL"].fmeasure for item in pool]
        best = max(scores, default=0.0)
        out.append((best, scores.index(best) if best > 0 else None))
    return out


@settings(max_examples=300, deadline=None)
@given(texts, texts)
def test_random_texts_match_rouge_score_to_the_bit(candidates, pool) -> None:
    assert nearest(candidates, pool) == reference_nearest(candidates, pool)


def test_many_texts_span_several_blocks() -> None:
    pool = [f"write a poem about item {i} and the sea" for i in range(40)]
    candidates = [f"write a story about item {i % 50} near the sea" for i in range(600)]
    assert nearest(candidates, pool) == reference_nearest(candidates, pool)


def test_unicode_tokenizer_sees_korean() -> None:
    pool = ["바다에 관한 짧은 시를 쓰세요.", "다음 문장을 영어로 번역하세요."]
    [(rouge_score, _)] = nearest(["바다에 관한 짧은 시를 쓰세요!"], pool)
    [(unicode_score, column)] = nearest(["바다에 관한 짧은 시를 쓰세요!"], pool, tokenizer="unicode")
    assert rouge_score == 0.0 and unicode_score == 1.0 and column == 0


def test_empty_pool_scores_zero() -> None:
    assert nearest(["write a poem"], []) == [(0.0, None)]
