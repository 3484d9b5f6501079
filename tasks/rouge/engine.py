"""An exact, incremental ROUGE-L novelty filter (the Self-Instruct / Alpaca filter, much faster).

Semantics, exactly those of rouge-score 0.1.2 with ``RougeScorer(["rougeL"])``:

- a pair scores the LCS F-measure, computed in floating point as rouge-score does it
  (``p = l / len(prediction)``, ``r = l / len(target)``, ``2 * p * r / (p + r)``, 0 when
  ``p + r == 0``); a pair where either side has no tokens scores 0;
- candidates are decided greedily in stream order: a candidate is rejected when its highest score
  against the pool (the references, then every candidate kept so far) is above the threshold,
  strictly; a kept candidate joins the pool at once, so later items of the same batch see it;
- every decision reports the exact highest score and the first pool item (lowest pool index)
  reaching it; ``most_similar`` is None when that score is 0 (nothing in common, or an empty text).

How it is fast, with every step exact:

1. Texts become lists of integer token ids, and each list becomes a string of one code point per
   token, so rapidfuzz's bit-parallel LCS (``LCSseq``) runs on them in C.
2. Rejection uses prefix filtering (AllPairs / PPJoin). A pair can score above ``t`` only if
   ``2 * min(m, n) / (m + n) > t`` and ``2 * overlap / (m + n) > t`` (``overlap`` = multiset
   intersection size, an upper bound of the LCS length). With a global token order (rarest first),
   an item of length n then needs an overlap of at least ``k(n) = floor(t * n / (2 - t)) + 1``,
   so two such items must share a token within their first ``len - k + 1`` tokens. The pool
   indexes only those prefixes, and a candidate probes only its own prefix: common words are
   never looked up, and only a handful of pairs per candidate reach the LCS. The bounds are
   applied with a 1e-9 margin, so rounding can only add candidates, never lose one.
   The token order (document frequency at the last rebuild) is frozen between rebuilds; the
   index is rebuilt whenever the pool doubles, which keeps the work linear overall.
3. A rejected candidate's highest score is above ``t``, so every pool item reaching it is among
   the probed candidates: its report is exact from step 2 alone. A kept candidate's highest score
   may be anywhere in [0, t], so it is computed against the whole pool in one rapidfuzz ``cdist``
   call per block of kept candidates (bit-parallel, in C, on ``workers`` threads), then scored in
   numpy with the same floating-point operations as rouge-score.

Use::

    f = RougeLFilter(threshold=0.7)
    f.add_references(seed_instructions)
    decisions = f.offer(new_instructions)   # one Decision per text, in order
    state = f.state_dict()                  # JSON-serialisable checkpoint
    f2 = RougeLFilter.from_state_dict(state)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from tasks.rouge.tokenize import TOKENIZERS, make_tokenizer

STATE_FORMAT = "alignflow.rouge_l_filter/1"

# Bounds are evaluated with this much slack below the threshold; float rounding is ~1e-16.
_MARGIN = 1e-9
# Token rank = document frequency at the last rebuild * _RANK_SCALE + token id (a total order).
_RANK_SCALE = 1 << 40
# Rebuild the index (fresh document frequencies) when the pool reaches this size, then doubles.
_FIRST_REBUILD = 64
# Kept candidates scored against the pool per cdist call (bounds the temporary matrices).
_EXACT_BLOCK = 64
# Highest code point usable for a token id once surrogates are skipped.
_MAX_CODEPOINT = 0x10FFFF


@dataclass(frozen=True, slots=True)
class Decision:
    """The filter's verdict on one candidate."""

    text: str
    kept: bool
    max_rouge_l: float  # highest ROUGE-L F-measure against the pool (exact, rouge-score's value)
    most_similar: str | None  # the first pool item reaching max_rouge_l; None when it is 0
    most_similar_index: int | None  # its index in pool order (references first, then kept)
    empty: bool  # the text has no tokens under the chosen tokenizer (scores 0 against everything)


def rouge_l_fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge-score's LCS F-measure from the LCS length and both token counts, bit for bit."""
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _codepoint(token_id: int) -> int:
    # Skip the surrogate block: those code points cannot stand alone in every string operation.
    return token_id if token_id < 0xD800 else token_id + 0x800


class RougeLFilter:
    """Greedy ROUGE-L novelty filter over a growing pool; see the module docstring."""

    def __init__(
        self,
        threshold: float = 0.7,
        tokenizer: str = "rouge",
        stemming: bool = False,
        workers: int = 1,
    ) -> None:
        """`workers`: threads for the exact-max LCS scan of kept candidates (-1: all cores)."""
        if not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        self.threshold = float(threshold)
        self.tokenizer = tokenizer
        self.stemming = bool(stemming)
        self.workers = workers
        self._tokenize = make_tokenizer(tokenizer, self.stemming)
        # Slightly lowered threshold for the pruning bounds (see _MARGIN).
        t = self.threshold - _MARGIN
        self._ratio = t / (2.0 - t)  # k(n) = floor(n * ratio) + 1
        self._inv = (2.0 - t) / t  # longest partner of a length-m item: floor(m * inv)

        self._vocab: dict[str, int] = {}
        self._chars: list[str | None] = []  # token id -> its one-character code (None: too large)
        self._df: list[int] = []  # token id -> number of pool items containing it
        self._rank: list[int] = []  # token id -> position in the global order (frozen between rebuilds)

        self._texts: list[str] = []  # pool, in pool order
        self._is_reference: list[bool] = []
        self._ids: list[list[int]] = []
        self._codes: list[str | list[int]] = []  # rapidfuzz input per pool item
        self._lens: list[int] = []
        self._len_array = np.zeros(1024, dtype=np.float64)
        self._postings: dict[int, list[int]] = {}
        self._built_at = 0  # pool size at the last rebuild

    # ----------------------------------------------------------------- public API
    def add_references(self, texts: Sequence[str]) -> None:
        """Add items (for example the seed instructions) that candidates are compared against."""
        for text in texts:
            ids = self._token_ids(text)
            self._append(text, ids, is_reference=True)

    def offer(self, texts: Sequence[str]) -> list[Decision]:
        """Decide each text in order; kept ones join the pool at once."""
        results: list[Decision | None] = []
        to_score: list[tuple[int, int]] = []  # (position in results, pool index) of kept texts
        for text in texts:
            ids = self._token_ids(text)
            if not ids:
                # Scores 0 against everything, so it is always kept; it still takes a pool slot,
                # as it does in the reference implementations.
                index = self._append(text, ids, is_reference=False)
                results.append(Decision(text, True, 0.0, None, None, True))
                continue
            code = self._code(ids)
            best, best_index = self._probe(ids, code)
            if best > self.threshold:
                results.append(Decision(text, False, best, self._texts[best_index], best_index, False))
                continue
            index = self._append(text, ids, is_reference=False, code=code)
            results.append(None)
            to_score.append((len(results) - 1, index))
        for start in range(0, len(to_score), _EXACT_BLOCK):
            block = to_score[start : start + _EXACT_BLOCK]
            for (slot, _), (best, best_index) in zip(block, self._exact_max([i for _, i in block])):
                text = texts[slot]
                if best > 0.0:
                    results[slot] = Decision(text, True, best, self._texts[best_index], best_index, False)
                else:
                    results[slot] = Decision(text, True, 0.0, None, None, False)
        return results  # type: ignore[return-value]

    @property
    def kept(self) -> list[str]:
        """Kept candidates in order (the references are not included)."""
        return [text for text, ref in zip(self._texts, self._is_reference) if not ref]

    @property
    def references(self) -> list[str]:
        """The reference items, in the order they were added."""
        return [text for text, ref in zip(self._texts, self._is_reference) if ref]

    @property
    def pool(self) -> list[str]:
        """Every item candidates are compared against, in pool order."""
        return list(self._texts)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable checkpoint (configuration and pool texts)."""
        return {
            "format": STATE_FORMAT,
            "threshold": self.threshold,
            "tokenizer": self.tokenizer,
            "stemming": self.stemming,
            "pool": list(self._texts),
            "is_reference": [int(ref) for ref in self._is_reference],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], workers: int = 1) -> "RougeLFilter":
        """Rebuild a filter from `state_dict()`'s output; it decides exactly as the original would."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a RougeLFilter state (expected format {STATE_FORMAT!r})")
        missing = [k for k in ("threshold", "tokenizer", "stemming", "pool", "is_reference") if k not in state]
        if missing:
            raise ValueError(f"RougeLFilter state lacks {', '.join(missing)}")
        pool, flags = state["pool"], state["is_reference"]
        if len(pool) != len(flags):
            raise ValueError("RougeLFilter state: 'pool' and 'is_reference' differ in length")
        engine = cls(state["threshold"], state["tokenizer"], state["stemming"], workers=workers)
        for text, flag in zip(pool, flags):
            engine._append(text, engine._token_ids(text), is_reference=bool(flag))
        return engine

    # ----------------------------------------------------------------- internals
    def _token_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}: {text!r}")
        vocab = self._vocab
        ids = []
        for token in self._tokenize(text):
            token_id = vocab.get(token)
            if token_id is None:
                token_id = self._new_token(token)
            ids.append(token_id)
        return ids

    def _new_token(self, token: str) -> int:
        token_id = len(self._vocab)
        self._vocab[token] = token_id
        point = _codepoint(token_id)
        self._chars.append(chr(point) if point <= _MAX_CODEPOINT else None)
        self._df.append(0)
        self._rank.append(token_id)  # unseen in the pool: document frequency 0
        return token_id

    def _code(self, ids: list[int]) -> str | list[int]:
        chars = self._chars
        try:
            return "".join([chars[i] for i in ids])  # type: ignore[misc]
        except TypeError:  # a vocabulary past ~1.1M tokens: rapidfuzz also takes int sequences
            return [_codepoint(i) for i in ids]

    def _prefix_len(self, length: int) -> int:
        return length - (math.floor(length * self._ratio) + 1) + 1

    def _append(self, text: str, ids: list[int], is_reference: bool, code: str | list[int] | None = None) -> int:
        index = len(self._texts)
        self._texts.append(text)
        self._is_reference.append(is_reference)
        self._ids.append(ids)
        self._codes.append(self._code(ids) if code is None else code)
        self._lens.append(len(ids))
        if index >= len(self._len_array):
            self._len_array = np.concatenate([self._len_array, np.zeros_like(self._len_array)])
        self._len_array[index] = len(ids)
        df = self._df
        for token_id in set(ids):
            df[token_id] += 1
        if index + 1 >= max(_FIRST_REBUILD, 2 * self._built_at):
            self._rebuild()
        else:
            self._index(index)
        return index

    def _index(self, index: int) -> None:
        ids = self._ids[index]
        if not ids:
            return
        ordered = sorted(ids, key=self._rank.__getitem__)
        postings = self._postings
        for token_id in set(ordered[: self._prefix_len(len(ids))]):
            bucket = postings.get(token_id)
            if bucket is None:
                postings[token_id] = [index]
            else:
                bucket.append(index)

    def _rebuild(self) -> None:
        """Re-rank tokens by current document frequency (rarest first) and re-index every prefix."""
        self._rank = [df * _RANK_SCALE + token_id for token_id, df in enumerate(self._df)]
        self._postings = {}
        for index in range(len(self._texts)):
            self._index(index)
        self._built_at = len(self._texts)

    def _probe(self, ids: list[int], code: str | list[int]) -> tuple[float, int | None]:
        """Highest score over the pool items that could score above the threshold (prefix filter)."""
        m = len(ids)
        ordered = sorted(ids, key=self._rank.__getitem__)
        postings = self._postings
        candidates: set[int] = set()
        for token_id in set(ordered[: self._prefix_len(m)]):
            bucket = postings.get(token_id)
            if bucket is not None:
                candidates.update(bucket)
        if not candidates:
            return 0.0, None
        low = math.floor(m * self._ratio) + 1
        high = math.floor(m * self._inv)
        lens, codes = self._lens, self._codes
        best, best_index = 0.0, None
        for index in sorted(candidates):  # ascending: ties keep the first pool item
            n = lens[index]
            if n < low or n > high:
                continue
            score = rouge_l_fmeasure(LCSseq.similarity(code, codes[index]), m, n)
            if score > best:
                best, best_index = score, index
        return best, best_index

    def _exact_max(self, indices: list[int]) -> list[tuple[float, int | None]]:
        """Exact highest score of each pool item `indices[i]` against the pool items before it."""
        columns = max(indices)
        if columns == 0:
            return [(0.0, None) for _ in indices]
        queries = [self._codes[i] for i in indices]
        lcs = process.cdist(
            queries, self._codes[:columns], scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers
        )
        lengths = self._len_array[:columns]
        m = np.array([self._lens[i] for i in indices], dtype=np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            # The very operations of rouge-score, in float64, elementwise.
            precision = lcs / lengths
            recall = lcs / m
            scores = 2 * precision * recall / (precision + recall)
        scores[lcs == 0] = 0.0
        # Each item sees only the pool before it.
        scores[np.arange(columns)[None, :] >= np.array(indices)[:, None]] = -1.0
        best = scores.argmax(axis=1)  # first maximum: the lowest pool index wins ties
        results: list[tuple[float, int | None]] = []
        for row, col in enumerate(best):
            value = float(scores[row, col])
            results.append((value, int(col)) if value > 0.0 else (0.0, None))
        return results
