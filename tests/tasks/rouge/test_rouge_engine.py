"""The filter engine decides and scores exactly as rouge-score does, in both of its strategies.

The reference implementation below is the obvious one: rouge-score's RougeScorer(["rougeL"]) on
every (candidate, pool item) pair, greedily in order, as Self-Instruct and Alpaca run it.
"""

from __future__ import annotations

import collections
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

import tasks.rouge.engine as engine_module
from tasks.rouge.engine import Decision, RougeLFilter, rouge_l_fmeasure

SCORER = rouge_scorer.RougeScorer(["rougeL"])


def reference_filter(references, candidates, threshold):
    """(kept, max score, index of the first pool item reaching it or None when 0) per candidate."""
    pool = list(references)
    out = []
    for text in candidates:
        best, best_index = 0.0, None
        for index, other in enumerate(pool):
            # Alpaca and Self-Instruct score (target=new candidate, prediction=pool item).
            score = SCORER.score(text, other)["rougeL"].fmeasure
            if score > best:
                best, best_index = score, index
        kept = not best > threshold
        out.append((kept, best, best_index))
        if kept:
            pool.append(text)
    return out


@pytest.fixture(params=["one", "rounds", "parallel"])
def strategy(request, monkeypatch):
    """Run a test with the defaults (one round per few hundred candidates, in this process), with
    rounds of 5 candidates, verification one pool item at a time and the common-token bits chosen
    again every few items (the in-round commit and the search's stopping rules face every case),
    and the same with two processes scoring every round (speculative parallel scoring)."""
    if request.param in ("rounds", "parallel"):
        monkeypatch.setattr(engine_module, "_ROUND", 5)
        monkeypatch.setattr(engine_module, "_FIRST_CHUNK", 1)
        monkeypatch.setattr(engine_module, "_FIRST_REBUILD", 4)
        monkeypatch.setattr(engine_module, "_COMMON_BITS", 3)
    if request.param == "parallel":
        monkeypatch.setattr(engine_module, "_PARALLEL_MIN", 1)
        monkeypatch.setattr(engine_module, "resolve_workers", lambda workers: 2)
    return request.param


WORDS = ["a", "b", "c", "d", "e", "the", "of", "write", "poem", "x1", "42"]
ODD_ITEMS = ["", "!!!", "... ?", "café", "日本語", "한국어 문장", "ÄÖÜ", "a", "the"]
token_text = st.one_of(
    st.lists(st.sampled_from(WORDS + ["...", ",", "ß", "é"]), max_size=9).map(" ".join),
    st.sampled_from(ODD_ITEMS),
    st.text(alphabet="ab .,é日", max_size=8),
)


def _check_against_reference(references, candidates, threshold, batch):
    engine = RougeLFilter(threshold=threshold)
    engine.add_references(references)
    decisions = []
    for start in range(0, len(candidates), batch):
        decisions.extend(engine.offer(candidates[start : start + batch]))
    expected = reference_filter(references, candidates, threshold)
    pool = list(references)
    for text, decision, (kept, best, best_index) in zip(candidates, decisions, expected):
        assert decision.text == text
        assert decision.kept == kept, (text, decision, best)
        assert decision.max_rouge_l == best, (text, decision, best)  # the same float, bit for bit
        assert decision.most_similar_index == best_index, (text, decision, best, best_index)
        assert decision.most_similar == (pool[best_index] if best_index is not None else None)
        assert decision.empty == (not SCORER._tokenizer.tokenize(text))
        if kept:
            pool.append(text)
    assert engine.kept == pool[len(references) :]


# The strategy fixture only picks constants, the same for every example.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    references=st.lists(token_text, max_size=6),
    candidates=st.lists(token_text, max_size=60),
    threshold=st.sampled_from([0.7, 0.5, 0.3, 0.9, 1.0, 0.05, 2 / 3]),
    batch=st.integers(min_value=1, max_value=70),
)
def test_random_streams_match_rouge_score(strategy, references, candidates, threshold, batch) -> None:
    _check_against_reference(references, candidates, threshold, batch)


def test_boundary_where_the_shortcut_formula_differs(strategy) -> None:
    # l=7, m=8, n=12: 2l/(m+n) is exactly 0.7, but rouge-score's 2pr/(p+r) is 0.7000000000000001.
    pool_item = "a b c d e f g h i j k l"
    candidate = "a b c d e f g z"
    assert rouge_l_fmeasure(7, 8, 12) > 0.7
    engine = RougeLFilter(0.7)
    engine.add_references([pool_item])
    (decision,) = engine.offer([candidate])
    assert not decision.kept
    assert decision.max_rouge_l == SCORER.score(candidate, pool_item)["rougeL"].fmeasure


def test_kept_items_join_the_pool_within_a_batch(strategy) -> None:
    engine = RougeLFilter(0.7)
    engine.add_references(["Translate the sentence into French."])
    decisions = engine.offer([
        "Write a poem about the sea.",
        "Write a poem about the sea!",  # duplicate of the previous item of the same batch
        "Translate the sentence into French",  # duplicate of a reference
        "",
    ])
    assert [d.kept for d in decisions] == [True, False, False, True]
    assert decisions[1].most_similar_index == 1 and decisions[1].max_rouge_l == 1.0
    assert decisions[2].most_similar_index == 0
    assert decisions[3].empty and decisions[3].most_similar is None
    assert engine.kept == ["Write a poem about the sea.", ""]
    assert engine.references == ["Translate the sentence into French."]


def test_ties_report_the_first_pool_item(strategy) -> None:
    engine = RougeLFilter(0.9)
    engine.add_references(["red green blue", "red green yellow", "red green blue"])
    (decision,) = engine.offer(["red green"])
    assert decision.most_similar_index == 0
    assert decision.max_rouge_l == pytest.approx(0.8)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, float("nan"), 2])
def test_threshold_outside_zero_one_is_an_error(threshold) -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        RougeLFilter(threshold)


def test_threshold_one_keeps_everything_but_still_scores() -> None:
    engine = RougeLFilter(1.0)
    decisions = engine.offer(["same text", "same text"])
    assert [d.kept for d in decisions] == [True, True]
    assert decisions[1].max_rouge_l == 1.0


def test_non_text_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="texts must be str"):
        RougeLFilter().offer([None])  # type: ignore[list-item]


def test_unicode_tokenizer_filters_korean_near_duplicates(strategy) -> None:
    texts = [
        "다음 문장을 영어로 번역하세요.",
        "다음 문장을 영어로 번역하세요!",  # same words
        "다음 문장을 영어로 빨리 번역하세요.",  # near duplicate: one word added
        "고양이에 대한 짧은 시를 써 주세요.",  # a different instruction
        "세 가지 건강 팁을 알려 주세요.",
    ]
    rouge = RougeLFilter(0.7)
    assert all(d.kept and d.empty for d in rouge.offer(texts))  # rouge-score sees no tokens at all
    unicode = RougeLFilter(0.7, tokenizer="unicode")
    assert [d.kept for d in unicode.offer(texts)] == [True, False, False, True, True]


def test_state_dict_round_trip_decides_the_same(strategy, instruction_stream) -> None:
    stream = instruction_stream(600)
    whole = RougeLFilter(0.7)
    whole.add_references(stream[:20])
    expected = whole.offer(stream[20:])

    first = RougeLFilter(0.7)
    first.add_references(stream[:20])
    got = first.offer(stream[20:300])
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    second = RougeLFilter.from_state_dict(state)
    got += second.offer(stream[300:])
    assert got == expected
    assert second.kept == whole.kept and second.references == whole.references


def test_from_state_dict_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match="not a RougeLFilter state"):
        RougeLFilter.from_state_dict({"pool": []})


def test_decision_is_frozen() -> None:
    decision = RougeLFilter().offer(["hello world"])[0]
    assert isinstance(decision, Decision)
    with pytest.raises(AttributeError):
        decision.kept = False  # type: ignore[misc]


def test_realistic_instructions_decide_as_rouge_score(strategy, instruction_stream) -> None:
    """A few thousand generated instructions (near-duplicates and recombinations included)."""
    stream = instruction_stream(2100)
    references, candidates = stream[:100], stream[100:]
    engine = RougeLFilter(0.7)
    engine.add_references(references)
    decisions = []
    for start in range(0, len(candidates), 100):
        decisions.extend(engine.offer(candidates[start : start + 100]))

    # rouge-score's decision for each candidate. Only pairs whose token multisets overlap enough
    # can score above 0.7 (LCS <= overlap), so rouge-score's LCS runs on those alone.
    tokenize = SCORER._tokenizer.tokenize
    pool = [(tokenize(t), collections.Counter(tokenize(t))) for t in references]
    for text, decision in zip(candidates, decisions):
        tokens = tokenize(text)
        counts = collections.Counter(tokens)
        rejected = False
        for other_tokens, other_counts in pool:
            overlap = sum((counts & other_counts).values())
            if tokens and other_tokens and 2 * overlap / (len(tokens) + len(other_tokens)) > 0.7 - 1e-6:
                if rouge_scorer._score_lcs(tokens, other_tokens).fmeasure > 0.7:
                    rejected = True
                    break
        assert decision.kept == (not rejected), text
        if not rejected:
            pool.append((tokens, counts))
    assert 0.2 < sum(d.kept for d in decisions) / len(decisions) < 0.9  # both outcomes well exercised

    # The reported maximum and most similar item, for a spread of candidates, with rouge-score on
    # every pair of the pool each one met.
    pool_texts = engine.pool
    kept_before = 0
    for position, (text, decision) in enumerate(zip(candidates, decisions)):
        if position % 97 == 5:
            scores = [SCORER.score(text, other)["rougeL"].fmeasure
                      for other in pool_texts[: len(references) + kept_before]]
            best = max(scores)
            assert decision.max_rouge_l == best
            assert decision.most_similar_index == (scores.index(best) if best > 0 else None)
        kept_before += decision.kept


def test_long_texts_decide_as_rouge_score(strategy) -> None:
    # Over 255 tokens, repeated words: occurrence features far past the first, LCS lengths past a byte.
    import random

    rng = random.Random(5)
    words = ["a", "b", "c", "d", "e", "f", "the", "of"]
    base = [rng.choice(words) for _ in range(260)]

    def variant(tokens: list[str], edits: int) -> str:
        tokens = list(tokens)
        for _ in range(edits):
            tokens[rng.randrange(len(tokens))] = rng.choice(words + ["x", "y"])
        return " ".join(tokens)

    references = [variant(base, 120), " ".join(base)]
    # LCS lengths above 255 (the near copies against `base`) must be counted in full.
    candidates = [variant(base, 100), " ".join(rng.choice(words) for _ in range(20)), variant(base, 3),
                  " ".join(base[:258])]
    _check_against_reference(references, candidates, 0.7, batch=3)


def test_vocabulary_past_the_code_point_range_decides_as_rouge_score(strategy, monkeypatch, instruction_stream) -> None:
    # Past ~1.1M distinct tokens, codes become lists of ints (a string cannot hold them); pretend
    # the range ends after 12 tokens so that pools mix both kinds of codes.
    monkeypatch.setattr(engine_module, "_MAX_CODEPOINT", 12)
    stream = instruction_stream(300)
    _check_against_reference(stream[:10], stream[10:], 0.7, batch=64)
    _check_against_reference([], [" ".join(WORDS), " ".join(reversed(WORDS)), "x1 42 poem", "a b c d e"], 0.5, batch=2)


@st.composite
def boundary_streams(draw):
    """Pool items and candidates that share exactly l tokens in order, with 2l / (m + n) at (or a
    token away from) the threshold, so rouge-score's float formula decides ties at the boundary."""
    threshold = draw(st.sampled_from([0.7, 0.5, 2 / 3, 0.6, 0.75, 0.8]))
    vocabulary = [f"w{i}" for i in range(400)]
    fresh = iter(vocabulary)
    texts = []
    for _ in range(draw(st.integers(1, 8))):
        total = draw(st.integers(4, 40))  # m + n
        m = draw(st.integers(1, total - 1))
        n = total - m
        lcs = min(m, n, max(1, round(threshold * total / 2) + draw(st.integers(-1, 1))))
        shared = [next(fresh) for _ in range(lcs)]
        item = shared + [next(fresh) for _ in range(n - lcs)]
        candidate = shared + [next(fresh) for _ in range(m - lcs)]
        texts += [" ".join(draw(st.permutations(item)) if draw(st.booleans()) else item), " ".join(candidate)]
    order = draw(st.permutations(range(len(texts))))
    return threshold, [texts[i] for i in order]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=boundary_streams(), split=st.integers(0, 4), batch=st.integers(1, 9))
def test_boundary_streams_match_rouge_score(strategy, stream, split, batch) -> None:
    threshold, texts = stream
    _check_against_reference(texts[:split], texts[split:], threshold, batch)


def test_pairs_exactly_at_the_threshold_are_kept(strategy) -> None:
    # l=7, m=n=10: 2l/(m+n) = 0.7 and rouge-score's float formula gives exactly 0.7: not above it.
    shared = [f"s{i}" for i in range(7)]
    item = " ".join(shared + ["x1", "x2", "x3"])
    candidate = " ".join(shared + ["y1", "y2", "y3"])
    assert rouge_l_fmeasure(7, 10, 10) == 0.7
    engine = RougeLFilter(0.7)
    engine.add_references([item])
    (decision,) = engine.offer([candidate])
    assert decision.kept and decision.max_rouge_l == SCORER.score(candidate, item)["rougeL"].fmeasure == 0.7
