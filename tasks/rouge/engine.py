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

1. Each text becomes a string of one code point per token, so rapidfuzz's bit-parallel LCS
   (``LCSseq``) runs on them in C. A block of texts is tokenized in one go (for the default
   tokenizer, ASCII text is lowered and split with one ``str.translate`` over the whole block,
   see ``make_batch_tokenizer``) and its tokens map straight to their characters through C-level
   ``map`` and ``join``: no Python frame per token and no list of ids. New words get code points
   most frequent first, so common words fall below 256, where rapidfuzz's pattern tables are a
   plain array instead of a hash map. Kept items join the pool's lists once per block.
2. Small pools (up to ``_SCAN_POOL`` items): a block of candidates is scored against the whole
   pool and against itself in one ``cdist`` call (LCS lengths in one byte each when the block's
   texts are shorter than 256 tokens); ``l / (m + n)`` in float32, which is half the F-measure up
   to rounding, finds each row's near-maximal columns (within 1e-6 of the row's maximum, far
   wider than float32 rounding, so the true maximum and its ties are always among them), and
   those are scored with rouge-score's float operations, all rows at once. Then each candidate
   of the block is decided in order. This beats any index while the pool is small: the kept
   candidates need every pair anyway for their exact maximum.
3. Larger pools: rejection uses prefix filtering (AllPairs / PPJoin). A pair can score above
   ``t`` only if ``2 * min(m, n) / (m + n) > t`` and ``2 * overlap / (m + n) > t`` (``overlap`` =
   multiset intersection size, an upper bound of the LCS length). With a global token order
   (rarest first), an item of length n needs an overlap of at least
   ``k(n) = floor(t * n / (2 - t)) + 1``, so two such items share a token within their first
   ``len - k + 1`` tokens: the pool indexes only those prefixes and a candidate probes only its
   own, so common words are never looked up. PPJoin's positional filter then drops an item whose
   first common token leaves too few tokens after it, on either side, to reach the overlap that
   the pair's lengths need. The surviving items are verified in the order of their bound, and the
   search stops once the best score found is above the threshold and above every remaining bound,
   so a near-duplicate costs a few LCS computations. All bounds use a 1e-9 margin, so rounding can
   only add candidates, never lose one. The token order (document frequency at the last rebuild)
   is frozen between rebuilds; the index is rebuilt when the pool doubles (linear work overall).
4. A rejected candidate's highest score is above ``t``, so every pool item reaching it is among
   the verified candidates: its report is exact from step 3. A kept candidate's highest score may
   be anywhere in [0, t], so it is computed against the whole pool in one ``cdist`` call per block
   of kept candidates (in C, on ``workers`` threads), like step 2. That part is quadratic in the
   number of kept items, at a few nanoseconds per pair.

Use::

    f = RougeLFilter(threshold=0.7)
    f.add_references(seed_instructions)
    decisions = f.offer(new_instructions)   # one Decision per text, in order
    state = f.state_dict()                  # JSON-serialisable checkpoint
    f2 = RougeLFilter.from_state_dict(state)
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, NamedTuple, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from tasks.rouge.tokenize import TOKENIZERS, make_batch_tokenizer, make_tokenizer

STATE_FORMAT = "alignflow.rouge_l_filter/1"

# Bounds are evaluated with this much slack below the threshold; float rounding is ~1e-16.
_MARGIN = 1e-9
# Token rank = document frequency at the last rebuild * _RANK_SCALE + token id (a total order).
_RANK_SCALE = 1 << 40
# Rebuild the index (fresh document frequencies) when the pool reaches this size, then doubles.
_FIRST_REBUILD = 64
# Kept candidates scored against the pool per cdist call (bounds the temporary matrices).
_EXACT_BLOCK = 64
# Candidates are taken in blocks of this many.
_BLOCK = 256
# While the pool (plus the block) is at most this large, a block is scored against the whole pool
# in C (cdist); past it, the prefix-filter index decides (measured crossover on template-like data).
_SCAN_POOL = 4000
# Scores within this factor of a row's approximate maximum are recomputed exactly.
_NEAR = 1 - 1e-9
# The same for the float32 values of the small-pool scan (float32 rounding is ~6e-8).
_NEAR_32 = 1 - 1e-6
_MARGIN_32 = 1e-6
# Up to this many probe candidates, verify them one call each; above, in one cdist call.
_SMALL_PROBE = 16
# Probe candidates are verified in chunks of about this many (between chunks, the search can stop).
_VERIFY_CHUNK = 32
# Highest code point usable for a token id once surrogates are skipped.
_MAX_CODEPOINT = 0x10FFFF


class _TokenCodes(dict):
    """token -> its code (one character, or an int past the Unicode range); unseen tokens get one."""

    __slots__ = ("_assign",)

    def __init__(self, assign) -> None:
        super().__init__()
        self._assign = assign  # RougeLFilter._new_token: picks the next code point and stores it

    def __missing__(self, token: str) -> str | int:
        self._assign(token)
        return dict.__getitem__(self, token)


class Decision(NamedTuple):
    """The filter's verdict on one candidate (an immutable record; built by the million, so a tuple)."""

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


def _fmeasures(lcs: np.ndarray, target_len: Any, prediction_len: np.ndarray) -> np.ndarray:
    """`rouge_l_fmeasure` elementwise: the very float64 operations, so the same bits."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        scores = 2 * precision * recall / (precision + recall)
    scores[lcs == 0] = 0.0  # also covers empty items (0 / 0)
    return scores


def _first(pair: tuple) -> Any:
    return pair[0]


def _codepoint(token_id: int) -> int:
    # Skip the surrogate block: those code points cannot stand alone in every string operation.
    return token_id if token_id < 0xD800 else token_id + 0x800


def _point(char: str | int) -> int:
    return ord(char) if isinstance(char, str) else char


def _points(code: str | list[int]) -> list[int]:
    """A pool item's tokens as code points (the index orders and looks tokens up by them)."""
    return list(map(ord, code)) if isinstance(code, str) else code


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
        self._tokenize_batch = make_batch_tokenizer(tokenizer, self.stemming)
        # Slightly lowered threshold for the pruning bounds (see _MARGIN).
        t = self.threshold - _MARGIN
        self._ratio = t / (2.0 - t)  # k(n) = floor(n * ratio) + 1
        self._inv = (2.0 - t) / t  # longest partner of a length-m item: floor(m * inv)
        self._half_t = t / 2.0  # a pair of lengths m, n needs overlap >= floor(half_t * (m + n)) + 1
        self._needed_overlap: list[int] = []
        self._least_lcs: dict[int, list[int]] = {}  # m -> n -> least LCS scoring above t

        # token -> its code: one character (the code point), or the int itself past the Unicode range
        self._chars: dict[str, str | int] = _TokenCodes(self._new_token)
        self._rank: list[int] = []  # code point -> position in the global order (frozen between rebuilds)

        self._texts: list[str] = []  # pool, in pool order
        self._is_reference: list[bool] = []
        self._codes: list[str | list[int]] = []  # rapidfuzz input per pool item (its tokens' code points)
        self._lens: list[int] = []
        self._len_array = np.zeros(1024, dtype=np.float64)
        self._scratch = np.empty(0, dtype=np.float32)  # the small-pool scan's l / (m + n) matrix
        # token -> item length n -> r (tokens from it to the item's end) -> pool indices
        self._postings: dict[int, dict[int, dict[int, list[int]]]] = {}
        self._built_at = 0  # pool size at the last rebuild
        self._indexed = False  # the prefix index exists (built once the pool outgrows scanning)

    # ----------------------------------------------------------------- public API
    def add_references(self, texts: Sequence[str]) -> None:
        """Add items (for example the seed instructions) that candidates are compared against."""
        texts = list(texts)
        for text, code in zip(texts, self._encode(texts)):
            self._append(text, code, is_reference=True)

    def offer(self, texts: Sequence[str]) -> list[Decision]:
        """Decide each text in order; kept ones join the pool at once."""
        texts = list(texts)
        results: list[Decision] = []
        for start in range(0, len(texts), _BLOCK):
            block = texts[start : start + _BLOCK]
            if len(self._texts) + len(block) <= _SCAN_POOL:
                results.extend(self._offer_scan(block))
            else:
                if not self._indexed:
                    self._indexed = True
                    self._rebuild()
                results.extend(self._offer_indexed(block))
        return results

    def _offer_scan(self, texts: list[str]) -> list[Decision]:
        """Small pool: every candidate of the block against the pool and the block, in one cdist call."""
        all_codes = self._encode(texts)
        codes = list(filter(None, all_codes))  # empty texts score 0 against everything
        count = len(codes)
        pool_size = len(self._texts)
        if count:
            query_lens = np.fromiter(map(len, codes), dtype=np.float64, count=count)
            # One call: the block against the pool, then against itself (the last `count` columns).
            # LCS lengths are at most the query's length: one byte each when that fits.
            lcs = process.cdist(codes, self._codes[:pool_size] + codes, scorer=LCSseq.similarity,
                                dtype=np.uint8 if query_lens.max() < 256 else np.int32,
                                workers=self.workers)
            # l / (m + n) is half the F-measure up to rounding: it finds the columns worth scoring
            # exactly. float32 is enough to find them: every column within _NEAR_32 of a row's
            # maximum is scored exactly, and float32 rounding (6e-8) is far inside that.
            columns = pool_size + count
            if self._scratch.size < count * columns:  # reused: no fresh pages for every block
                self._scratch = np.empty(2 * count * columns, dtype=np.float32)
            approx = self._scratch[: count * columns].reshape(count, columns)
            np.add(query_lens.astype(np.float32)[:, None],
                   np.concatenate([self._len_array[:pool_size], query_lens]).astype(np.float32), out=approx)
            np.divide(lcs, approx, out=approx)
            # Each row's best pool item: every column within _NEAR_32 of the row's maximum is
            # scored exactly (rouge-score's float operations), all rows at once.
            best_score = np.zeros(count)
            best_column = np.full(count, -1)
            if pool_size:
                pool_part = approx[:, :pool_size]
                row_max = pool_part.max(axis=1)
                cut = row_max * _NEAR_32
                cut[row_max <= 0.0] = np.inf  # nothing in common with the pool: no column
                # (1-D flatnonzero is many times faster than 2-D nonzero.)
                near_rows, near_columns = np.divmod(np.flatnonzero(pool_part >= cut[:, None]), pool_size)
                if near_rows.size:
                    scores = _fmeasures(lcs[near_rows, near_columns].astype(np.float64),
                                        query_lens[near_rows], self._len_array[near_columns])
                    # By row, then highest score, then lowest column: ties keep the first pool item.
                    order = np.lexsort((near_columns, -scores, near_rows))
                    sorted_rows = near_rows[order]
                    leading = np.ones(order.size, dtype=bool)
                    leading[1:] = sorted_rows[1:] != sorted_rows[:-1]
                    picked = order[leading]
                    best_score[near_rows[picked]] = scores[picked]
                    best_column[near_rows[picked]] = near_columns[picked]
            best_score, best_column = best_score.tolist(), best_column.tolist()
            block = approx[:, pool_size:]
            # Bound on what any earlier row of the block scores, kept or not: most rows skip
            # the block part.
            earlier_max = np.tril(block, -1).max(axis=1).tolist()
        threshold = self.threshold
        pool_texts = self._texts
        results: list[Decision] = []
        # Items joining the pool in this block, in order (empty texts take a slot too); they are
        # added to the pool's lists at the end, in one go.
        new_texts: list[str] = []
        new_codes: list[str | list[int]] = []
        row = -1
        kept_rows = 0
        pool_index_of_row: list[int] = []
        for text, code in zip(texts, all_codes):
            if not code:
                new_texts.append(text)
                new_codes.append(code)
                results.append(Decision(text, True, 0.0, None, None, True))
                continue
            row += 1
            best_index = best_column[row]
            best = best_score[row] if best_index >= 0 else 0.0
            # 2l / (m + n) bounds the F-measure (up to rounding): most rows skip the block part.
            if kept_rows and earlier_max[row] > 0.0 and 2.0 * earlier_max[row] >= best - _MARGIN_32:
                line = block[row, :row]  # rejected rows' columns are masked: kept rows only
                block_max = line.max()
                if block_max > 0.0 and 2.0 * block_max >= best - _MARGIN_32:
                    m = len(code)
                    for other in np.flatnonzero(line >= block_max * _NEAR_32).tolist():
                        score = rouge_l_fmeasure(int(lcs[row, pool_size + other]), m, len(codes[other]))
                        if score > best:  # later pool items win only when strictly higher
                            best, best_index = score, pool_index_of_row[other]
            if best > threshold:
                similar = pool_texts[best_index] if best_index < pool_size else new_texts[best_index - pool_size]
                results.append(Decision(text, False, best, similar, best_index, False))
                block[row + 1 :, row] = -1.0  # later rows do not see a rejected one
                pool_index_of_row.append(-1)
                continue
            pool_index_of_row.append(pool_size + len(new_texts))
            new_texts.append(text)
            new_codes.append(code)
            kept_rows += 1
            if best > 0.0:
                similar = pool_texts[best_index] if best_index < pool_size else new_texts[best_index - pool_size]
                results.append(Decision(text, True, best, similar, best_index, False))
            else:
                results.append(Decision(text, True, 0.0, None, None, False))
        self._extend_pool(new_texts, new_codes)
        return results

    def _offer_indexed(self, texts: list[str]) -> list[Decision]:
        """Large pool: prefix-filter probes decide; kept candidates get their exact maximum after."""
        results: list[Decision | None] = []
        to_score: list[tuple[int, int]] = []  # (position in results, pool index) of kept texts
        for text, code in zip(texts, self._encode(texts)):
            if not code:
                # Scores 0 against everything, so it is always kept; it still takes a pool slot,
                # as it does in the reference implementations.
                index = self._append(text, code, is_reference=False)
                results.append(Decision(text, True, 0.0, None, None, True))
                continue
            best, best_index = self._probe(_points(code), code)
            if best > self.threshold:
                results.append(Decision(text, False, best, self._texts[best_index], best_index, False))
                continue
            index = self._append(text, code, is_reference=False)
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
        for text, code, flag in zip(pool, engine._encode(pool), flags):
            engine._append(text, code, is_reference=bool(flag))
        return engine

    # ----------------------------------------------------------------- internals
    def _encode(self, texts: list[str]) -> list[str | list[int]]:
        """Each text as its tokens' code points: a string of one character per token.

        Tokens map straight to their character (no list of ids in between), and a block whose
        tokens are all known is encoded by C-level maps alone: no Python frame per token.
        """
        try:
            token_lists = self._tokenize_batch(texts)
        except (AttributeError, TypeError):
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"texts must be str, got {type(text).__name__}: {text!r}") from None
            raise
        chars = self._chars
        if len(chars) < 256:
            # The first texts (the references, usually) hand out the code points below 256:
            # rapidfuzz looks those up in a table and the others in a hash map, so the most
            # frequent words should get them.
            counts = Counter(chain.from_iterable(token_lists))
            for token in sorted(counts.keys() - chars.keys(), key=lambda t: (-counts[t], t)):
                self._new_token(token)
        # C-level maps alone, no Python frame per token; an unseen token gets the next code point
        # on its first lookup (`_TokenCodes.__missing__`).
        lookup = chars.__getitem__
        try:
            return list(map("".join, map(map, repeat(lookup), token_lists)))
        except TypeError:  # a vocabulary past ~1.1M tokens: rapidfuzz also takes int sequences
            return [[_point(chars[token]) for token in tokens] for tokens in token_lists]

    def _new_token(self, token: str) -> None:
        point = _codepoint(len(self._chars))
        rank = self._rank
        while len(rank) < point:  # the skipped surrogate block: never used
            rank.append(len(rank))
        rank.append(point)  # unseen in the pool: document frequency 0
        self._chars[token] = chr(point) if point <= _MAX_CODEPOINT else point

    def _prefix_len(self, length: int) -> int:
        return length - (math.floor(length * self._ratio) + 1) + 1

    def _append(self, text: str, code: str | list[int], is_reference: bool) -> int:
        index = len(self._texts)
        self._texts.append(text)
        self._is_reference.append(is_reference)
        self._codes.append(code)
        self._lens.append(len(code))
        if index >= len(self._len_array):
            self._len_array = np.concatenate([self._len_array, np.zeros_like(self._len_array)])
        self._len_array[index] = len(code)
        if not self._indexed:  # small pools are scanned whole; the index is built when needed
            return index
        if index + 1 >= max(_FIRST_REBUILD, 2 * self._built_at):
            self._rebuild()
        else:
            self._index(index)
        return index

    def _extend_pool(self, texts: list[str], codes: list[str | list[int]]) -> None:
        """Append kept items in one go (the small-pool scan: no index to maintain)."""
        start = len(self._texts)
        self._texts.extend(texts)
        self._is_reference.extend([False] * len(texts))
        self._codes.extend(codes)
        lens = list(map(len, codes))
        self._lens.extend(lens)
        while start + len(lens) > len(self._len_array):
            self._len_array = np.concatenate([self._len_array, np.zeros_like(self._len_array)])
        self._len_array[start : start + len(lens)] = lens

    def _index(self, index: int) -> None:
        """Index the prefix of pool item `index`: token -> r (tokens from it to the end) -> items."""
        ids = _points(self._codes[index])
        if not ids:
            return
        n = len(ids)
        ordered = sorted(ids, key=self._rank.__getitem__)
        postings = self._postings
        previous = -1
        for j in range(self._prefix_len(n)):
            token_id = ordered[j]
            if token_id == previous:  # repeats are adjacent; the first occurrence bounds best
                continue
            previous = token_id
            by_length = postings.get(token_id)
            if by_length is None:
                postings[token_id] = {n: {n - j: [index]}}
                continue
            by_remaining = by_length.get(n)
            if by_remaining is None:
                by_length[n] = {n - j: [index]}
                continue
            bucket = by_remaining.get(n - j)
            if bucket is None:
                by_remaining[n - j] = [index]
            else:
                bucket.append(index)

    def _extend_needed(self, total: int) -> None:
        # needed[s]: least overlap for a pair whose lengths sum to s to score above the threshold.
        needed = self._needed_overlap
        needed.extend(math.floor(self._half_t * s) + 1 for s in range(len(needed), 2 * total + 1))

    def _rebuild(self) -> None:
        """Re-rank tokens by current document frequency (rarest first) and re-index every prefix."""
        df = [0] * len(self._rank)  # code point -> number of pool items holding it
        for code in self._codes:
            for point in set(_points(code)):
                df[point] += 1
        self._rank = [count * _RANK_SCALE + point for point, count in enumerate(df)]
        self._postings = {}
        for index in range(len(self._texts)):
            self._index(index)
        self._built_at = len(self._texts)

    def _probe(self, ids: list[int], code: str | list[int]) -> tuple[float, int | None]:
        """Highest score over the pool items that could score above the threshold.

        Prefix filter plus PPJoin's positional filter: if the smallest common token (in the
        global order) sits at position i of the candidate and has r tokens from it to the end of
        the pool item, their overlap is at most min(m - i, r), and it must reach
        k(m, n) = floor(t * (m + n) / 2) + 1.
        """
        m = len(ids)
        ordered = sorted(ids, key=self._rank.__getitem__)
        postings = self._postings
        low = math.floor(m * self._ratio) + 1  # shortest possible partner
        high = math.floor(m * self._inv)  # longest possible partner
        least_overlap = math.floor(self._half_t * (m + low)) + 1  # k(m, n) for every partner
        needed = self._needed_overlap
        if len(needed) <= m + high:
            self._extend_needed(m + high)
        passing: list[tuple[float, list[int]]] = []  # (overlap bound / (m + n), bucket)
        previous = -1
        for i in range(self._prefix_len(m)):
            token_id = ordered[i]
            if token_id == previous:
                continue
            previous = token_id
            left = m - i  # candidate tokens from this one to the end
            if left < least_overlap:
                break
            by_length = postings.get(token_id)
            if by_length is None:
                continue
            # Items are bucketed by length n, then by r = tokens from this one to their end: a
            # bucket passes or fails whole on the bound min(left, r). An item is first seen at its
            # smallest common token, which gives its valid bound; later sightings give smaller
            # ones, so an item pruned then is pruned again: taking passing buckets whole is exact.
            for n, by_remaining in by_length.items():
                if n < low or n > high:
                    continue
                need = needed[m + n]
                if left < need:
                    continue
                for remaining, bucket in by_remaining.items():
                    if remaining >= need:
                        passing.append(((left if left < remaining else remaining) / (m + n), bucket))
        if not passing:
            return 0.0, None
        least = self._least_lcs.get(m)
        if least is None or len(least) <= high:
            least = self._least_lcs[m] = [self._least_lcs_above(m, n) for n in range(max(high, 2 * m) + 1)]
        # Verify the most promising buckets first: once a score above the threshold is found,
        # buckets whose bound 2 * overlap / (m + n) is below it cannot hold the maximum (nor tie
        # it), so a near-duplicate is settled after a few LCS computations. Pairs that cannot go
        # above the threshold need no score here: a kept candidate's maximum is computed after.
        passing.sort(key=_first, reverse=True)
        pending: list[int] = []
        chunk = _VERIFY_CHUNK
        best, best_index = 0.0, None
        threshold = self.threshold
        for bound, bucket in passing:
            if best > threshold and 2.0 * bound < best - _MARGIN:
                break
            pending.extend(bucket)
            if len(pending) >= chunk:
                # An item met again in a later chunk is verified again: cheaper than tracking it.
                best, best_index = self._verify(code, m, list(dict.fromkeys(pending)), least, best, best_index)
                pending = []
                chunk *= 2  # few calls when everything must be verified (kept candidates)
        if pending:
            best, best_index = self._verify(code, m, list(dict.fromkeys(pending)), least, best, best_index)
        return best, best_index

    def _verify(self, code: str | list[int], m: int, indices: list[int], least: list[int],
                best: float, best_index: int | None) -> tuple[float, int | None]:
        """Update (best, best_index) with the pairs scoring above the threshold among `indices`."""
        codes, lens = self._codes, self._lens
        if len(indices) <= _SMALL_PROBE:
            for index in indices:
                n = lens[index]
                lcs = LCSseq.similarity(code, codes[index], score_cutoff=least[n])
                if lcs >= least[n]:
                    score = rouge_l_fmeasure(lcs, m, n)
                    if score > best or (score == best and index < best_index):  # ties: first item
                        best, best_index = score, index
            return best, best_index
        pick = itemgetter(*indices)  # many items at C speed (a tuple, as len(indices) > 1)
        lengths = pick(lens)
        lcs = process.cdist([code], pick(codes), scorer=LCSseq.similarity,
                            dtype=np.int32, score_cutoff=min(least[n] for n in set(lengths)))[0]
        for position in np.flatnonzero(lcs).tolist():
            n = lengths[position]
            if lcs[position] >= least[n]:
                score = rouge_l_fmeasure(int(lcs[position]), m, n)
                index = indices[position]
                if score > best or (score == best and index < best_index):
                    best, best_index = score, index
        return best, best_index

    def _least_lcs_above(self, m: int, n: int) -> int:
        """Smallest LCS length whose score for lengths (m, n) is above the threshold (or > min)."""
        shortest = min(m, n)
        lcs = max(1, math.floor(self.threshold * (m + n) / 2) - 2)
        while lcs <= shortest and not rouge_l_fmeasure(lcs, m, n) > self.threshold:
            lcs += 1
        while lcs > 1 and rouge_l_fmeasure(lcs - 1, m, n) > self.threshold:
            lcs -= 1
        return lcs

    def _exact_max(self, indices: list[int]) -> list[tuple[float, int | None]]:
        """Exact highest score of each pool item `indices[i]` against the pool items before it."""
        columns = max(indices)
        if columns == 0:
            return [(0.0, None) for _ in indices]
        queries = [self._codes[i] for i in indices]
        lcs = process.cdist(
            queries, self._codes[:columns], scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers
        )
        lens = self._lens
        m = np.array([lens[i] for i in indices], dtype=np.float64)[:, None]
        # 2l / (m + n) equals rouge-score's F-measure up to rounding, so its row maximum finds the
        # few columns that can hold the exact maximum; those are then scored exactly.
        approx = lcs / (m + self._len_array[:columns])
        for row, index in enumerate(indices):
            approx[row, index:] = -1.0  # each item sees only the pool before it
        first_max = approx.argmax(axis=1)
        row_max = approx[np.arange(len(indices)), first_max]
        # Rows with a single near-maximal column need no search for ties; score those vectorised.
        near_counts = (approx >= (row_max * _NEAR)[:, None]).sum(axis=1).tolist()
        first_score = _fmeasures(lcs[np.arange(len(indices)), first_max], m[:, 0],
                                 self._len_array[first_max]).tolist()
        first_max, row_max = first_max.tolist(), row_max.tolist()
        results: list[tuple[float, int | None]] = []
        for row, index in enumerate(indices):
            if row_max[row] <= 0.0:
                results.append((0.0, None))
                continue
            if near_counts[row] == 1:
                results.append((first_score[row], first_max[row]))
                continue
            best, best_index = 0.0, None
            query_len = lens[index]
            for col in np.flatnonzero(approx[row] >= row_max[row] * _NEAR).tolist():
                score = rouge_l_fmeasure(int(lcs[row, col]), query_len, lens[col])
                if score > best:  # columns ascend: ties keep the first pool item
                    best, best_index = score, col
            results.append((best, best_index))
        return results
